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
