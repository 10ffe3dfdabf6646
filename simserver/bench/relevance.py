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

from simserver.bench.common import BenchError, bench_environment

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
            images.append((f"site{i}/{s.label}/img{counter}.jpg", buf.getvalue()))  # label: for scoring
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
    sites: list[Site], index, encode: Encode, target: str, config, calibration: dict
) -> tuple[list[bool], float, dict]:
    """The endpoint's algorithm (simserver.relevance), in process: one batched encoding per site.
    Also the image-level recall and false-positive rate on the site images (to set beside the
    calibration's estimates)."""
    from simserver.preprocess import prepare
    from simserver.relevance import judge_site

    decisions = []
    similar: list[bool] = []
    is_target: list[bool] = []
    t0 = time.perf_counter()
    for _, images in sites:
        # As the endpoint does: decode the site's images, one encoder call for all of them.
        vectors = encode(np.stack([prepare(data, 224, 10**8) for _, data in images]))
        names = [name for name, _ in images]
        verdict = judge_site(
            names, index.search(vectors, config.top_k), target, config, calibration=calibration
        )
        decisions.append(verdict.relevant)
        similar += [i.similar for i in verdict.images]
        is_target += [name.split("/")[1] == target for name in names]
    seconds = time.perf_counter() - t0
    sim, tgt = np.asarray(similar), np.asarray(is_target)
    image_figures = {
        "recall": round(float(sim[tgt].mean()), 4) if tgt.any() else None,
        "false_positive_rate": round(float(sim[~tgt].mean()), 4) if (~tgt).any() else None,
        "target_images": int(tgt.sum()),
        "other_images": int((~tgt).sum()),
    }
    return decisions, seconds, image_figures


def verdict_figures(decisions: list[bool], truth: list[bool], seconds: float) -> dict:
    """Accuracy, precision and recall of site verdicts ("relevant" is the positive class)."""
    d, t = np.asarray(decisions, bool), np.asarray(truth, bool)
    tp = int((d & t).sum())
    return {
        "accuracy": round(float((d == t).mean()), 4),
        "precision": round(tp / int(d.sum()), 4) if d.any() else None,
        "recall": round(tp / int(t.sum()), 4) if t.any() else None,
        "seconds": round(seconds, 2),
    }


def relevance_figures(
    data: Path,
    domain: str = "almonds-suppliers",
    target: str | None = None,
    n_sites: int = 40,
    seed: int = 0,
    reference_runtimes: tuple[str, ...] = ("savedmodel", "serving"),
) -> dict:
    """Both algorithms on the same synthetic sites; ``target`` defaults to the domain's target_label.
    ``reference_runtimes``: run the reference as written ("savedmodel", TF through hub) and/or on the
    serving runtime ("serving"); none skips it. Raises ``BenchError`` for an unknown domain, one
    without a target, or a target the data has no folder of."""
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
        raise BenchError(f"unknown domain {domain!r} (known: {', '.join(domains)})")
    cfg = domains[domain]
    target = target or cfg.target_label
    if not target:
        raise BenchError(f"domain {domain} has no target_label: give a target with --target")
    cfg = cfg.model_copy(update={"target_label": target})
    if not Path(data).is_dir():
        raise BenchError(f"--data {data}: not a folder of <category>/<image>")
    samples = read_folder(data, cfg.limits).samples
    labels = sorted({s.label for s in samples})
    if target not in labels:
        raise BenchError(
            f"target {target!r} is not a category of {data} (categories: {', '.join(labels) or 'none'}): "
            "give one with --target"
        )
    if len(labels) < 2:
        raise BenchError(f"{data} has only the category {target!r}: sites need other images too")
    catalogue, pool = split_catalogue(samples, seed)
    sites = make_sites(pool, target, n_sites, seed)
    truth = [relevant for relevant, _ in sites]

    with tempfile.TemporaryDirectory(prefix="bench-relevance-") as tmp:
        store = LocalStore(Path(tmp) / "store")
        fast = EncoderPool(cache_dir=settings.store_cache_dir, store=store)
        t0 = time.perf_counter()
        report = train_domain(Repository(store), cfg, Dataset(catalogue, []), LocalBackend(fast, cfg.encoder))
        train_s = time.perf_counter() - t0
        index = Repository(store).load(cfg.name, report.version)
        encoder = report.meta["encoder"]
        served = fast.get(encoder)
        calibration = report.meta["relevance"]
        # The reference reads its target images from their files each time, as the notebook did.
        targets = [data / s.name for s in catalogue if s.label == target]

        ours_decisions, ours_s, ours_images = ours(
            sites, index, served.encode, target, cfg.relevance, calibration
        )
        result = {"ours": {**verdict_figures(ours_decisions, truth, ours_s), "site_images": ours_images}}
        logger.info("ours: %s", result["ours"])
        runtimes = {"savedmodel": "reference", "serving": "reference_on_serving_runtime"}
        for runtime in reference_runtimes:
            enc = served
            if runtime == "savedmodel":
                tf_pool = EncoderPool(cache_dir=settings.store_cache_dir, store=store, runtime="savedmodel")
                enc = tf_pool.get(encoder)
            decisions, seconds = reference(sites, targets, enc.encode, seed)
            figures = verdict_figures(decisions, truth, seconds)
            figures["speedup"] = round(seconds / ours_s, 1)
            figures["runtime"] = enc.runtime
            result[runtimes[runtime]] = figures
            logger.info("%s: %s", runtimes[runtime], figures)

    return {
        **result,
        "data": str(data),
        "sites": len(sites),
        "relevant_sites": sum(truth),
        "site_images": sum(len(images) for _, images in sites),
        "target": target,
        "catalogue_images": len(catalogue),
        "catalogue_target_images": len(targets),
        "encoder": {"id": served.id, "serving_runtime": served.runtime},
        "promoted": report.meta["evaluation"]["promoted"],
        "training_seconds": round(train_s, 1),
        "calibration": calibration,
    }
