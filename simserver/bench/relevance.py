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
   and the site threshold derived from it (``site_rule``).
5. Site by site, each algorithm in turn, so that on a shared machine load changes hit all alike;
   wall and CPU seconds (this process) are summed per algorithm.
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
from simserver.builder import public_relevance
from simserver.int8 import float_name
from simserver.schemas import SiteVerdict

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


class Clock:
    """Wall and CPU seconds (this process, every thread) spent inside ``with clock:`` blocks."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Clock:
        self._t = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._t[0]
        self.cpu += time.process_time() - self._t[1]


def reference_site(
    images: list[tuple[str, bytes]], catalogue_targets: list[Path], encode: Encode, rng: np.random.Generator
) -> bool:
    """The notebook on one site: 16 single-image encoder calls per site image, random target draws."""
    from simserver.preprocess import prepare

    similar = 0
    for _, data in images:
        v = encode(prepare(data, 224, 10**8)[None])[0]
        draws = rng.choice(len(catalogue_targets), VAL_NUM, replace=len(catalogue_targets) < VAL_NUM)
        distances = []
        for j in draws:
            w = encode(prepare(catalogue_targets[int(j)].read_bytes(), 224, 10**8)[None])[0]
            distances.append(1.0 - float(np.dot(v, w)))
        similar += int(np.mean(distances) <= REFERENCE_IMAGE_DISTANCE)
    return similar / len(images) >= REFERENCE_SITE_FRACTION


def ours_site(
    images: list[tuple[str, bytes]], index, encode: Encode, target: str, config, calibration: dict
) -> SiteVerdict:
    """The endpoint's algorithm (simserver.relevance) on one site, in process: the site's images
    decoded, one encoder call for all of them, kNN margins, the calibrated thresholds."""
    from simserver.preprocess import prepare
    from simserver.relevance import judge_site

    vectors = encode(np.stack([prepare(data, 224, 10**8) for _, data in images]))
    names = [name for name, _ in images]
    return judge_site(
        names, index.search(vectors, config.top_k), target, config, calibration=calibration, vectors=vectors
    )


def _shows_target(name: str, target: str) -> bool:
    """Whether a site image (named ``site<i>/<label>/img<n>.jpg`` by :func:`make_sites`) is one of
    the target's."""
    return name.split("/")[1] == target


def image_figures(verdicts: list[SiteVerdict], target: str) -> dict:
    """Image-level recall and false-positive rate on the site images (beside the calibration's)."""
    sim = np.asarray([i.similar for v in verdicts for i in v.images])
    tgt = np.asarray([_shows_target(i.name, target) for v in verdicts for i in v.images])
    return {
        "recall": round(float(sim[tgt].mean()), 4) if tgt.any() else None,
        "false_positive_rate": round(float(sim[~tgt].mean()), 4) if (~tgt).any() else None,
        "target_images": int(tgt.sum()),
        "other_images": int((~tgt).sum()),
    }


def misjudged(verdicts: list[SiteVerdict], truth: list[bool], target: str) -> list[dict]:
    """The sites ours got wrong, with what decided them: how many images, how many of the target,
    how many judged similar (and of those, how many were not the target)."""
    out = []
    for site, (v, relevant) in enumerate(zip(verdicts, truth, strict=True)):
        if v.relevant == relevant:
            continue
        tgt = [_shows_target(img.name, target) for img in v.images]
        out.append(
            {
                "site": site,
                "relevant": relevant,
                "images": len(v.images),
                "target_images": sum(tgt),
                "similar": sum(img.similar for img in v.images),
                "similar_not_target": sum(
                    img.similar and not t for img, t in zip(v.images, tgt, strict=True)
                ),
                "fraction": round(v.fraction, 4),
                "site_threshold": round(v.site_threshold, 4),
            }
        )
    return out


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

        encoders = {"ours": served}
        for runtime in reference_runtimes:
            if runtime == "savedmodel":
                tf_pool = EncoderPool(cache_dir=settings.store_cache_dir, store=store, runtime="savedmodel")
                # As written: TF through hub with the float32 model (the notebook had no int8 runtime),
                # whichever runtime the training chose to serve.
                encoders["reference"] = tf_pool.get(float_name(encoder))
            else:
                encoders["reference_on_serving_runtime"] = served
        # Site by site, each algorithm in turn: on a shared machine both see the same load.
        clocks = {name: Clock() for name in encoders}
        decisions: dict[str, list[bool]] = {name: [] for name in encoders}
        rngs = {name: np.random.default_rng(seed) for name in encoders}
        verdicts = []
        for i, (_, images) in enumerate(sites):
            with clocks["ours"]:
                verdicts.append(ours_site(images, index, served.encode, target, cfg.relevance, calibration))
            decisions["ours"].append(verdicts[-1].relevant)
            for name in list(encoders)[1:]:
                with clocks[name]:
                    decisions[name].append(reference_site(images, targets, encoders[name].encode, rngs[name]))
            logger.info("site %d/%d done", i + 1, len(sites))
        result: dict = {}
        for name, clock in clocks.items():
            figures = verdict_figures(decisions[name], truth, clock.wall)
            figures["cpu_seconds"] = round(clock.cpu, 2)
            if name == "ours":
                figures["site_images"] = image_figures(verdicts, target)
                figures["misjudged"] = misjudged(verdicts, truth, target)
            else:
                figures["speedup"] = round(clock.wall / clocks["ours"].wall, 1)
                figures["cpu_speedup"] = round(clock.cpu / max(clocks["ours"].cpu, 1e-9), 1)
                figures["runtime"] = encoders[name].runtime
            result[name] = figures
            logger.info("%s: %s", name, figures)

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
        "calibration": public_relevance(calibration),
    }
