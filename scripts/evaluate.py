"""Evaluate pretrained vs fine-tuned embeddings on a labelled set, without touching any domain.

python scripts/evaluate.py --data demo/fashion --json
python scripts/evaluate.py --data set.zip --domain almonds-suppliers --report var/reports/almonds.html

Stratified hold-out (the domain's training settings), head fine-tuned on the rest, both embeddings
scored on the hold-out: Recall@1, Recall@5, mAP@R, per-class Recall@1. Prints one JSON object with
--json, and writes an HTML report (per-class bars, Recall@K plot, worst queries with their top 5).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm import tqdm  # noqa: E402

from simserver.domain_config import DomainConfig, load_domains  # noqa: E402
from simserver.encoder_pool import EncoderPool, LocalBackend  # noqa: E402
from simserver.errors import ClientError  # noqa: E402
from simserver.ingest import read_folder, read_zip  # noqa: E402
from simserver.report import render  # noqa: E402
from simserver.settings import PROJECT_ROOT, get_settings  # noqa: E402
from simserver.training import FeatureCache, backbone_features, fit_and_evaluate  # noqa: E402

METRICS = ("recall_at_1", "recall_at_5", "map_at_r")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="folder or .zip of <category>/<image>")
    ap.add_argument("--domain", help="use this domain's encoder, limits and training settings")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument(
        "--report", type=Path, help="HTML report path (default var/reports/<name>-evaluation.html)"
    )
    ap.add_argument("--metric-loss", choices=("none", "contrastive", "triplet", "multi_similarity"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    if args.domain:
        domains = load_domains(settings.domains_dir)
        if args.domain not in domains:
            ap.error(f"unknown domain {args.domain!r} (known: {', '.join(domains)})")
        cfg = domains[args.domain]
    else:
        cfg = DomainConfig(name="evaluation")
    training = cfg.training
    if args.metric_loss:
        training = training.model_copy(update={"metric_loss": args.metric_loss})
    try:
        if args.data.is_dir():
            dataset = read_folder(args.data, cfg.limits)
        else:
            dataset = read_zip(args.data.read_bytes(), cfg.limits)
    except (OSError, zipfile.BadZipFile) as exc:
        print(f"error: cannot read {args.data}: {exc}", file=sys.stderr)
        return 2
    except ClientError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    pool = EncoderPool.from_settings(settings)
    backend = LocalBackend(pool, cfg.encoder)
    t0 = time.perf_counter()
    with tqdm(total=len(dataset.samples), desc="encode", unit="img", file=sys.stderr) as bar:

        def progress(n: int) -> None:
            if bar.n + n > bar.total:
                bar.total = bar.n + n
            bar.update(n)

        cache = FeatureCache(settings.store_cache_dir, backend.encoder_id)
        features = backbone_features(dataset.samples, backend, cache, settings.encode_batch_size, progress)
        try:
            out = fit_and_evaluate(
                dataset.samples,
                features,
                backend,
                training,
                "auto",
                cache,
                settings.encode_batch_size,
                progress,
            )
        except ClientError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 2
    seconds = time.perf_counter() - t0
    result = {
        "pretrained": {k: out.pretrained.summary()[k] for k in METRICS} if out.pretrained else None,
        "finetuned": {k: out.finetuned.summary()[k] for k in METRICS} if out.finetuned else None,
        "n": len(dataset.samples),
        "queries": len(out.split.holdout),
        "promoted": out.promoted,
        "reason": out.reason,
        "seconds": round(seconds, 2),
    }
    results = {
        n: r for n, r in (("pretrained", out.pretrained), ("finetuned", out.finetuned)) if r is not None
    }
    if results:
        name = args.domain or args.data.stem
        path = args.report or PROJECT_ROOT / "var" / "reports" / f"{name}-evaluation.html"
        path.parent.mkdir(parents=True, exist_ok=True)
        queries = [dataset.samples[i] for i in out.split.holdout]
        gallery = [dataset.samples[i] for i in out.split.train]
        path.write_text(
            render(f"Evaluation: {name}", results, queries, gallery, {**result, "n": result["n"]})
        )
        result["report"] = str(path)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{'embedding':<12} {'Recall@1':>9} {'Recall@5':>9} {'mAP@R':>7}")
        for n, r in results.items():
            print(f"{n:<12} {r.recall_at_1:9.3f} {r.recall_at_5:9.3f} {r.map_at_r:7.3f}")
        print(f"{result['n']} images, {result['queries']} hold-out queries; {out.reason}")
        if "report" in result:
            print(f"report: {result['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
