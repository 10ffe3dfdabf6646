"""``simserver evaluate``: pretrained against fine-tuned embeddings on a labelled set, touching no domain."""

from __future__ import annotations

import argparse
import json
import logging
import time
import zipfile
from pathlib import Path
from typing import Any

from simserver.cli.common import HelpFormatter, fail, progress_bar

logger = logging.getLogger(__name__)

METRICS = ("recall_at_1", "recall_at_5", "map_at_r")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="pretrained vs fine-tuned on a labelled set's hold-out (+ HTML report); no domain changes",
        description="Stratified hold-out (the domain's training settings), head fine-tuned on the rest, both "
        "embeddings scored on the hold-out: Recall@1, Recall@5, mAP@R, per-class Recall@1. Writes an HTML "
        "report (per-class bars, Recall@K plot, worst queries with their top 5).",
        epilog="examples:\n"
        "  simserver evaluate --data demo/fashion --json\n"
        "  simserver evaluate --data set.zip --domain almonds-suppliers --report var/reports/almonds.html",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--data", type=Path, required=True, help="folder or .zip of <category>/<image>")
    p.add_argument("--domain", help="use this domain's encoder, limits and training settings")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument(
        "--report", type=Path, help="HTML report path (default var/reports/<name>-evaluation.html)"
    )
    p.add_argument("--metric-loss", choices=("none", "contrastive", "triplet", "multi_similarity"))
    p.set_defaults(func=evaluate, log_level=logging.WARNING, parser=p)


def evaluate(args: argparse.Namespace) -> int:
    from simserver.domain_config import DomainConfig, load_domains
    from simserver.encoder_pool import EncoderPool, LocalBackend
    from simserver.errors import RequestRefused
    from simserver.features import FeatureCache, backbone_features
    from simserver.fit_evaluate import fit_and_evaluate
    from simserver.ingest import read_folder, read_zip
    from simserver.report import render
    from simserver.settings import PROJECT_ROOT, get_settings

    settings = get_settings()
    if args.domain:
        domains = load_domains(settings.domains_dir)
        if args.domain not in domains:
            args.parser.error(f"unknown domain {args.domain!r} (known: {', '.join(domains)})")
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
        return fail(f"cannot read {args.data}: {exc}")
    except RequestRefused as exc:
        return fail(exc.message)
    pool = EncoderPool.from_settings(settings)
    backend = LocalBackend(pool, cfg.encoder)
    t0 = time.perf_counter()
    with progress_bar(len(dataset.samples), "encode") as advance:
        cache = FeatureCache(settings.store_cache_dir, backend.encoder_id)
        features = backbone_features(dataset.samples, backend, cache, settings.encode_batch_size, advance)
        try:
            out = fit_and_evaluate(
                dataset.samples,
                features,
                backend,
                training,
                "auto",
                cache,
                settings.encode_batch_size,
                advance,
            )
        except RequestRefused as exc:
            return fail(exc.message)
    seconds = time.perf_counter() - t0
    result: dict[str, Any] = {
        "pretrained": {k: out.pretrained.summary()[k] for k in METRICS} if out.pretrained else None,
        "finetuned": {k: out.finetuned.summary()[k] for k in METRICS} if out.finetuned else None,
        "n": len(dataset.samples),
        "queries": len(out.split.holdout),
        "promoted": out.promoted,
        "reason": out.reason,
        "seconds": round(seconds, 2),
    }
    ev = out.evaluation()
    for side in ("pretrained", "finetuned"):
        if result[side] is not None and ev[side] and "recall_at_1_ci" in ev[side]:
            result[side]["recall_at_1_ci"] = ev[side]["recall_at_1_ci"]
    result["gain"], result["open_set"] = ev["gain"], ev["open_set"]
    results = {
        n: r for n, r in (("pretrained", out.pretrained), ("finetuned", out.finetuned)) if r is not None
    }
    if results:
        name = args.domain or args.data.stem
        path = args.report or PROJECT_ROOT / "var" / "reports" / f"{name}-evaluation.html"
        path.parent.mkdir(parents=True, exist_ok=True)
        queries = [dataset.samples[i] for i in out.split.holdout]
        gallery = [dataset.samples[i] for i in out.split.train]
        path.write_text(render(f"Evaluation: {name}", results, queries, gallery, dict(result)))
        result["report"] = str(path)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'embedding':<12} {'Recall@1':>9} {'Recall@5':>9} {'mAP@R':>7}")
    for n, r in results.items():
        lo, hi = result[n].get("recall_at_1_ci", (float("nan"),) * 2)
        print(f"{n:<12} {r.recall_at_1:9.3f} {r.recall_at_5:9.3f} {r.map_at_r:7.3f}  [{lo:.3f}, {hi:.3f}]")
    print(f"{result['n']} images, {result['queries']} hold-out queries; {out.reason}")
    if "report" in result:
        print(f"report: {result['report']}")
    return 0
