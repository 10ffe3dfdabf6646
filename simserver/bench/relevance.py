"""Supplier-site relevance: the reference notebook's algorithm against ``/relevance``'s, same sites.

1. Per category, a third of the images (at least one) become the "site pool", the rest the
   catalogue; a domain is trained on the catalogue with the real pipeline (fine-tuning, calibration).
2. Synthetic sites of 8-16 images: relevant ones 25-60% target images, irrelevant ones 0-10%, the
   rest from the other categories. Every site image is an augmented view (crop, flip, colour) of a
   site-pool image, saved as JPEG, so no site image is byte-identical to anything indexed.
3. Reference (as in the notebook): per site image, encode it and 15 randomly drawn catalogue target
   images (16 encoder calls, one image per call, images read from their files each time); similar
   when the mean cosine distance is <= 0.65; relevant when >= 25% of the images are similar. It runs
   on TF through tensorflow_hub as the notebook did, and again on the serving runtime (TFLite) to
   separate what the algorithm saves from what the runtime saves.
4. Ours (the endpoint's code): every site image decoded and encoded once, in batches, with the same
   encoder the domain serves; kNN margins against the domain's index; the calibrated image threshold
   and the 0.25 site threshold.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from simserver.bench.common import bench_environment

logger = logging.getLogger(__name__)

VAL_NUM = 15
REFERENCE_IMAGE_DISTANCE = 0.65
REFERENCE_SITE_FRACTION = 0.25

Site = tuple[bool, list[tuple[str, bytes]]]  # (relevant?, [(name, JPEG bytes)])
Encode = Callable[[np.ndarray], np.ndarray]


def split_catalogue(samples: list, seed: int) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    by_label: dict[str, list] = {}
    for s in samples:
        by_label.setdefault(s.label, []).append(s)
    catalogue, pool = [], []
    for label in sorted(by_label):
        group = list(by_label[label])
        rng.shuffle(group)
        n_pool = max(1, len(group) // 3)
        pool += group[:n_pool]
        # A category with one image lends it to both sides (its site copies are augmented views).
        catalogue += group[n_pool:] if len(group) > 1 else group
    return catalogue, pool


def make_sites(pool: list, target: str, n_sites: int, seed: int) -> list[Site]:
    from PIL import Image

    from simserver.augment import view

    rng = np.random.default_rng(seed)
    targets = [s for s in pool if s.label == target]
    others = [s for s in pool if s.label != target]
    sites = []
    counter = 0
    for i in range(n_sites):
        relevant = i % 2 == 0
        size = int(rng.integers(8, 17))
        if relevant:
            n_target = math.ceil(rng.uniform(0.25, 0.6) * size)
        else:
            n_target = math.floor(rng.uniform(0.0, 0.1) * size)
        picks = [targets[int(j)] for j in rng.integers(0, len(targets), n_target)]
        picks += [others[int(j)] for j in rng.integers(0, len(others), size - n_target)]
        images = []
        for s in picks:
            counter += 1
            pixels = view(s.pixels, hashlib.sha256(s.data).hexdigest(), counter, seed)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, "JPEG", quality=90)
            images.append((f"site{i}/img{counter}.jpg", buf.getvalue()))
        order = rng.permutation(len(images))
        sites.append((relevant, [images[int(j)] for j in order]))
    return sites


def reference(
    sites: list[Site], catalogue_targets: list[Path], encode: Encode, seed: int
) -> tuple[list[bool], float]:
    """The notebook: 16 single-image encoder calls per site image, random target draws."""
    from simserver.preprocess import prepare

    rng = np.random.default_rng(seed)
    decisions = []
    t0 = time.perf_counter()
    for _, images in sites:
        similar = 0
        for _, data in images:
            v = encode(prepare(data, 224, 10**8)[None])[0]
            draws = rng.choice(len(catalogue_targets), VAL_NUM, replace=len(catalogue_targets) < VAL_NUM)
            distances = []
            for j in draws:
                w = encode(prepare(catalogue_targets[int(j)].read_bytes(), 224, 10**8)[None])[0]
                distances.append(1.0 - float(np.dot(v, w)))
            similar += int(np.mean(distances) <= REFERENCE_IMAGE_DISTANCE)
        decisions.append(similar / len(images) >= REFERENCE_SITE_FRACTION)
    return decisions, time.perf_counter() - t0


def ours(
    sites: list[Site],
    index,
    encode: Encode,
    target: str,
    k: int,
    image_threshold: float,
    site_threshold: float,
) -> tuple[list[bool], float]:
    """The endpoint's algorithm (simserver.relevance), in process: one batched encoding per image."""
    from simserver.preprocess import prepare
    from simserver.relevance import score_neighbours, site_decision

    decisions = []
    t0 = time.perf_counter()
    for _, images in sites:
        # As the endpoint does: decode the site's images, one encoder call for all of them.
        vectors = encode(np.stack([prepare(data, 224, 10**8) for _, data in images]))
        margins = [
            score_neighbours([h.label for h in hits], [h.score for h in hits], target).margin
            for hits in index.search(vectors, k)
        ]
        decisions.append(site_decision(margins, image_threshold, site_threshold)[2])
    return decisions, time.perf_counter() - t0


def relevance_figures(
    data: Path, domain: str = "almonds-suppliers", target: str | None = None, n_sites: int = 40, seed: int = 0
) -> dict:
    """Both algorithms on the same synthetic sites; ``target`` defaults to the domain's target_label.
    Raises ``ValueError`` for an unknown domain or one without a target."""
    bench_environment()
    from simserver.domain_config import load_domains
    from simserver.encoder_pool import EncoderPool, LocalBackend
    from simserver.ingest import Dataset, read_folder
    from simserver.repository import Repository
    from simserver.settings import get_settings
    from simserver.store import LocalStore
    from simserver.training import train_domain

    settings = get_settings()
    domains = load_domains(settings.domains_dir)
    if domain not in domains:
        raise ValueError(f"unknown domain {domain!r} (known: {', '.join(domains)})")
    cfg = domains[domain]
    target = target or cfg.target_label
    if not target:
        raise ValueError(f"domain {domain} has no target_label: give a target")
    cfg = cfg.model_copy(update={"target_label": target})
    samples = read_folder(data, cfg.limits).samples
    catalogue, pool = split_catalogue(samples, seed)
    sites = make_sites(pool, target, n_sites, seed)
    truth = [relevant for relevant, _ in sites]

    with tempfile.TemporaryDirectory(prefix="bench-relevance-") as tmp:
        store = LocalStore(Path(tmp) / "store")
        fast = EncoderPool(cache_dir=settings.store_cache_dir, store=store)
        report = train_domain(Repository(store), cfg, Dataset(catalogue, []), LocalBackend(fast, cfg.encoder))
        index = Repository(store).load(cfg.name, report.version)
        encoder = report.meta["encoder"]
        served = fast.get(encoder)
        as_written = EncoderPool(cache_dir=settings.store_cache_dir, store=store, runtime="savedmodel").get(
            encoder
        )
        calibration = report.meta["relevance"]
        # The reference reads its target images from their files each time, as the notebook did.
        targets = [data / s.name for s in catalogue if s.label == target]

        ours_decisions, ours_s = ours(
            sites,
            index,
            served.encode,
            target,
            cfg.relevance.top_k,
            calibration["image_threshold"],
            cfg.relevance.site_threshold,
        )
        logger.info("ours: %.1f s; the reference runs twice (TF, then the serving runtime)", ours_s)
        ref_decisions, ref_s = reference(sites, targets, as_written.encode, seed)
        ref_fast_decisions, ref_fast_s = reference(sites, targets, served.encode, seed)

    def accuracy(decisions: list[bool]) -> float:
        return round(float(np.mean([d == t for d, t in zip(decisions, truth, strict=True)])), 4)

    return {
        "accuracy_reference": accuracy(ref_decisions),
        "accuracy_ours": accuracy(ours_decisions),
        "seconds_reference": round(ref_s, 2),
        "seconds_ours": round(ours_s, 2),
        "speedup": round(ref_s / ours_s, 1),
        "reference_on_serving_runtime": {
            "accuracy": accuracy(ref_fast_decisions),
            "seconds": round(ref_fast_s, 2),
            "speedup": round(ref_fast_s / ours_s, 1),
        },
        "sites": len(sites),
        "site_images": sum(len(images) for _, images in sites),
        "target": target,
        "catalogue_images": len(catalogue),
        "catalogue_target_images": len(targets),
        "encoder": {
            "id": served.id,
            "serving_runtime": served.runtime,
            "reference_runtime": as_written.runtime,
        },
        "promoted": report.meta["evaluation"]["promoted"],
        "image_threshold": calibration["image_threshold"],
        "calibration": {
            k: calibration[k] for k in ("method", "precision", "recall", "positives", "negatives")
        },
    }
