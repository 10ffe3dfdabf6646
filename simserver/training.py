"""A training: backbone features once per image, fine-tune a head, evaluate, promote, publish.

``mode`` (form field or ``training.mode`` in the domain's yaml):

* ``auto``: fine-tune on the training split and promote the result only if the bootstrap interval
  of its Recall@1 gain on the stratified hold-out is above 0 and, with whole categories held out
  (open set), it is not more than 1 point below pretrained (:func:`simserver.evaluation.decide`,
  ``training.promotion``);
* ``finetune``: always promote the fine-tuned encoder (still evaluated when a hold-out exists);
* ``pretrained``: index with the domain's configured encoder; the pretrained embedding is still
  evaluated.

Whatever the decision, the new version indexes every image of the archive, and its ``meta.json``
holds the evaluation. The promoted encoder is exactly the one that was evaluated (it is not
re-fitted on the hold-out afterwards), so the numbers describe what serves.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

import numpy as np

from simserver.backend import Backend, Progress, Stage
from simserver.builder import BuildReport, publish_version
from simserver.calibration import CalibrationData, calibrate_all
from simserver.domain_config import DomainConfig
from simserver.errors import RequestRefused
from simserver.features import FeatureCache, backbone_features
from simserver.fit_evaluate import Outcome, fit_and_evaluate, scored_parts
from simserver.ingest import Dataset, Sample, check_unique_ids
from simserver.repository import Repository, new_version_id
from simserver.runtime_choice import served_runtime

logger = logging.getLogger(__name__)


def merge_catalog(repo: Repository, cfg: DomainConfig, dataset: Dataset, image_size: int = 224) -> Dataset:
    """``catalog=merge``: the current catalog's items (their stored images) with ``dataset``
    upserted into it by id, as one dataset to fine-tune, evaluate and index. Items added to the
    catalog while the training runs are not in it (the published version replaces them)."""
    version = repo.current_version(cfg.name)
    if version is None:
        return dataset
    current = repo.load(cfg.name, version)
    new = {s.id for s in dataset.samples}
    kept = [
        Sample(
            it.name,
            it.label,
            repo.image(it.image_key),
            it.media_type,
            dict(it.metadata),
            image_size,
            cfg.limits.max_image_pixels,
            cfg.limits.max_decoded_bytes,
            it.id,
        )
        for it in current.iter_items()
        if it.id not in new
    ]
    logger.info("domain %s: merging %d new items into %d catalog items", cfg.name, len(new), len(kept))
    merged = Dataset(kept + dataset.samples, dataset.skipped)
    check_unique_ids(merged.samples)
    return merged


def check_dataset(cfg: DomainConfig, dataset: Dataset) -> None:
    """Refuse a dataset this domain cannot be trained on (before anything is encoded)."""
    if not dataset.samples:
        raise RequestRefused("no usable image in the archive")
    if cfg.target_label and cfg.target_label not in dataset.labels():
        raise RequestRefused(
            f"domain {cfg.name!r} decides relevance for target label {cfg.target_label!r}, but the archive "
            f"has no {cfg.target_label}/ folder (categories: {', '.join(dataset.labels())})"
        )


@dataclass
class Promotion:
    """What the new version serves: the encoder and its vectors of every dataset image."""

    encoder: str
    encoder_id: str
    vectors: np.ndarray


def promote(
    cfg: DomainConfig, version: str, outcome: Outcome, features: np.ndarray, backend: Backend
) -> Promotion:
    """Export backbone + head as the version's own encoder when the head was promoted."""
    if not (outcome.promoted and outcome.head is not None):
        return Promotion(backend.encoder, backend.encoder_id, features)
    t = time.perf_counter()
    encoder_id = f"{backend.encoder_id}+head:{cfg.name}/{version}"
    encoder = backend.export(
        outcome.head,
        f"domains/{cfg.name}/versions/{version}/encoder.tar",
        {"id": encoder_id, "domain": cfg.name, "version": version, "training": cfg.training.model_dump()},
    )
    outcome.seconds["export"] = time.perf_counter() - t
    return Promotion(encoder, encoder_id, outcome.head.apply(features))


def calibrate_duplicates(
    cfg: DomainConfig,
    dataset: Dataset,
    served: Promotion,
    outcome: Outcome,
    backend: Backend,
    batch_size: int,
    cache: FeatureCache | None = None,
    repo: Repository | None = None,
) -> dict:
    """The duplicate decision (:mod:`simserver.duplicates`), on synthetic copies of a capped number
    of the dataset's images encoded in the embedding the version serves."""
    from simserver import duplicates
    from simserver.int8 import INT8_PREFIX, int8_name

    # The copies in the embedding the version serves: its head only if it is the fine-tuned one,
    # its backbone on the runtime it serves (float32 or int8, simserver.runtime_choice).
    head = outcome.head if outcome.promoted else None
    int8 = served.encoder.startswith(INT8_PREFIX) and hasattr(backend, "encode_with")

    def backbone(pixels: np.ndarray) -> np.ndarray:
        if int8:
            return backend.encode_with(pixels, int8_name(backend.encoder))  # type: ignore[attr-defined]
        return backend.encode(pixels)

    def encode(pixels: np.ndarray) -> np.ndarray:
        # The copies are seeded, so a retraining makes the same ones: cached by their pixels.
        tag = "dup8-" if int8 else "dup-"
        keys = [tag + hashlib.sha256(p.tobytes()).hexdigest() for p in pixels]
        got = [cache.get(k) if cache is not None else None for k in keys]
        todo = [i for i, g in enumerate(got) if g is None]
        if todo:
            fresh = np.asarray(backbone(pixels[todo]), np.float32)
            for i, v in zip(todo, fresh, strict=True):
                got[i] = v
                if cache is not None:
                    cache.put(keys[i], v)
        f = np.stack([g for g in got if g is not None])
        return head.apply(f) if head is not None else f

    samples = dataset.samples

    def original(r: int) -> bytes:
        # A distributed build's samples carry no bytes: its actors stored the images already.
        s = samples[r]
        return s.data if s.data or repo is None or not s.image_key else repo.image(s.image_key)

    return duplicates.calibrate_rows(
        cfg.duplicates,
        original,
        served.vectors,
        np.asarray([s.label for s in samples]),
        encode,
        cfg.metric,
        samples[0].image_size if samples else 224,
        batch_size,
    )


def learn_fusion(cfg: DomainConfig, dataset: Dataset, vectors: np.ndarray, backend: Backend) -> dict | None:
    """Domains with ``text:``: the fusion weights and match threshold this version serves with
    (:mod:`simserver.fusion_learning`), in the embedding it serves."""
    text = cfg.text
    if text is None:
        return None
    from simserver.fusion_learning import learn_for_training
    from simserver.index import Item

    # Backends without a text encoder (tests' encode-only ones) keep the yaml's weights.
    encode_text = getattr(backend, "encode_text", None)
    items = [Item(s.name, s.label, "", s.media_type, dict(s.metadata), id=s.id) for s in dataset.samples]
    return learn_for_training(
        text,
        items,
        vectors,
        (lambda texts: encode_text(texts, text.encoder)) if encode_text is not None else None,
        cfg.metric,
        cfg.training.holdout_fraction,
        cfg.training.seed,
    )


def train_domain(
    repo: Repository,
    cfg: DomainConfig,
    dataset: Dataset,
    backend: Backend,
    *,
    mode: str | None = None,
    cache: FeatureCache | None = None,
    batch_size: int = 32,
    progress: Progress | None = None,
    started: float | None = None,
    stage: Stage | None = None,
    features: np.ndarray | None = None,
) -> BuildReport:
    """Publish a new version of ``cfg.name`` from ``dataset`` (already read); see the module
    docstring. The stages, in order: check, features, split + fit + evaluate (one decision),
    promote, calibrate, publish. Nothing is visible until publish moves the pointer.
    ``features``: the samples' backbone features when already computed (a distributed build's)."""
    t0 = started if started is not None else time.perf_counter()
    check_dataset(cfg, dataset)
    previous = repo.current_version(cfg.name)
    version = new_version_id()
    at = stage or (lambda name, total: None)
    at("encoding", len(dataset.samples))
    t = time.perf_counter()
    if features is None:
        features = backbone_features(dataset.samples, backend, cache, batch_size, progress)
    encode_seconds = time.perf_counter() - t
    at("training", 0)
    outcome = fit_and_evaluate(
        dataset.samples,
        features,
        backend,
        cfg.training,
        mode or cfg.training.mode,
        cache,
        batch_size,
        progress,
        stage=stage,
    )
    at("evaluating", 0)
    outcome.seconds = {"encode": encode_seconds, **outcome.seconds}
    served = promote(cfg, version, outcome, features, backend)
    served, features, runtime = served_runtime(
        cfg, dataset.samples, outcome, served, features, backend, cache, batch_size
    )
    labels = np.asarray([s.label for s in dataset.samples])
    parts = None
    if cfg.target_label:  # relevance calibrates on every image, each unseen by the head scoring it
        parts = scored_parts(
            dataset.samples,
            features,
            outcome,
            served.vectors,
            cfg.relevance.folds,
            backend,
            cfg.training,
            cache,
            batch_size,
            progress,
        )
    calibrations = calibrate_all(CalibrationData(cfg, outcome.split, served.vectors, labels, parts))
    calibrations["duplicates"] = calibrate_duplicates(
        cfg, dataset, served, outcome, backend, batch_size, cache, repo
    )
    fusion = learn_fusion(cfg, dataset, served.vectors, backend)
    logger.info("domain %s: %s", cfg.name, outcome.reason)
    at("indexing", 0)
    return publish_version(
        repo,
        cfg.name,
        dataset,
        served.vectors,
        encoder_id=served.encoder_id,
        encoder=served.encoder,
        metric=cfg.metric,
        policy=cfg.index,
        version=version,
        previous=previous,
        extra_meta={
            "evaluation": {
                **outcome.evaluation(),
                "pair": calibrations.get("pair"),
                "worst_queries": outcome.worst_queries(dataset.samples),
                "fusion": fusion,
            },
            **calibrations,
            **({"fusion": fusion} if fusion is not None else {}),
            "runtime": runtime.summary(cfg.encoder_runtime.int8_max_loss),
        },
        started=t0,
        stage=stage,
    )
