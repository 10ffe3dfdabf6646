"""The float32 / int8 decision of real trainings on labelled folders (``simserver bench encoder
--data DIR``): each folder is trained as a domain (the ``--domain`` config, default ``food``) by the
training pipeline itself, into a scratch store, and its ``runtime`` block reported."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def runtime_row(meta: dict) -> dict:
    """The figures of a version's ``runtime`` block that the bench and README report."""
    r = meta.get("runtime") or {}
    return {
        "serving_encoder": meta.get("encoder"),
        "runtime": r.get("runtime"),
        "float32_recall_at_1": (r.get("float32") or {}).get("recall_at_1"),
        "int8_recall_at_1": (r.get("int8") or {}).get("recall_at_1"),
        "holdout_queries": (r.get("int8") or {}).get("queries"),
        **{
            k: r.get(k) for k in ("recall_at_1_loss", "recall_at_1_loss_ci", "map_at_r_loss", "int8_max_loss")
        },
        "img_per_s_in_training": r.get("img_per_s"),
        "int8_seconds_in_training": r.get("seconds"),
    }


def trained_decisions(data: list[Path], domain: str = "food") -> dict[str, dict]:
    from simserver.domain_config import load_domains
    from simserver.encoder_pool import EncoderPool, LocalBackend
    from simserver.ingest import read_folder
    from simserver.repository import Repository
    from simserver.settings import get_settings
    from simserver.store import LocalStore
    from simserver.training import train_domain

    settings = get_settings()
    cfg = load_domains(settings.domains_dir)[domain]
    pool = EncoderPool.from_settings(settings)
    backend = LocalBackend(pool, cfg.encoder)
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        repo = Repository(LocalStore(Path(tmp)), cfg.catalog)
        for folder in data:
            dataset = read_folder(folder, cfg.limits)
            t0 = time.perf_counter()
            report = train_domain(repo, cfg, dataset, backend, batch_size=settings.encode_batch_size)
            row = runtime_row(report.meta)
            row["images"], row["training_seconds"] = len(dataset.samples), round(time.perf_counter() - t0, 1)
            row["promoted"] = (report.meta.get("evaluation") or {}).get("promoted")
            out[folder.name] = row
            logger.info("%s: %s", folder.name, row)
    return out


def calibration_study(
    domains: tuple[str, ...] = ("food", "fashion", "almonds-suppliers"), n: int = 64
) -> dict:
    """Per bundled domain: pretrained hold-out Recall@1 and mAP@R of float32, of the shared int8
    model (calibrated on all bundled domains) and of an int8 model calibrated on ``n`` of the
    domain's own training images; and the seconds one conversion takes (what calibrating per
    domain would add to every training)."""
    import numpy as np

    from simserver.bench.common import DEMO, bench_environment
    from simserver.domain_config import Limits
    from simserver.encoder import TFLiteInterpreter, builtin_model_path
    from simserver.encoder_pool import EncoderPool
    from simserver.evaluation import evaluate_retrieval, stratified_split
    from simserver.ingest import read_folder
    from simserver.int8 import convert_int8
    from simserver.metrics import l2_normalize
    from simserver.runtime_choice import choose
    from simserver.settings import get_settings

    bench_environment()
    settings = get_settings()
    _, saved_model = builtin_model_path(settings.builtin_model)
    pool = EncoderPool(builtin_model=settings.builtin_model)
    float32, shared = pool.get("builtin"), pool.get("int8:builtin")
    out: dict = {}
    for d in domains:
        samples = read_folder(DEMO / d, Limits()).samples
        labels = np.asarray([s.label for s in samples])
        split = stratified_split(labels.tolist())
        pixels = np.stack([s.pixels for s in samples])
        own_images = pixels[np.random.default_rng(0).permutation(split.train)[:n]]
        t0 = time.perf_counter()
        own_model = convert_int8(saved_model, own_images)
        convert_s = time.perf_counter() - t0
        own = TFLiteInterpreter(own_model, 2)
        vecs = {
            "float32": float32.encode(pixels),
            "int8_shared": shared.encode(pixels),
            "int8_own": l2_normalize(own(pixels.astype(np.float32) / 255.0)),
        }
        res = {
            k: evaluate_retrieval(
                v[split.holdout], labels[split.holdout], v[split.train], labels[split.train]
            )
            for k, v in vecs.items()
        }
        row: dict = {"convert_seconds": round(convert_s, 1), "queries": len(split.holdout)}
        for k in ("int8_shared", "int8_own"):
            dec = choose(res["float32"], res[k], 0.01)
            cos = np.sum(vecs["float32"] * vecs[k], axis=1)
            row[k] = {
                "recall_at_1": round(res[k].recall_at_1, 4),
                "map_at_r": round(res[k].map_at_r, 4),
                "cosine_to_float32_mean": round(float(cos.mean()), 4),
                "decision": dec.runtime,
                "recall_at_1_loss_ci": [round(v, 4) for v in dec.recall_at_1_loss_ci or ()],
            }
        row["float32"] = {
            "recall_at_1": round(res["float32"].recall_at_1, 4),
            "map_at_r": round(res["float32"].map_at_r, 4),
        }
        out[d] = row
        logger.info("%s: %s", d, row)
    return out
