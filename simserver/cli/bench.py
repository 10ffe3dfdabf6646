"""``simserver bench …``: the benchmarks of :mod:`simserver.bench`, one subcommand each.

Each prints its figures (indented JSON, or a table for ``http``) or, with ``--json``, one JSON
object on one line. Progress goes to stderr. They load TensorFlow, FAISS or start a server: run them
on an otherwise quiet machine, the figures are only comparable side by side.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from simserver.cli.common import fail, print_json

logger = logging.getLogger(__name__)


def _levels(text: str) -> tuple[tuple[int, int], ...]:
    """``1:300,4:600`` -> ((1, 300), (4, 600)): clients and requests per load level."""
    try:
        levels = tuple((int(c), int(n)) for c, n in (part.split(":") for part in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CLIENTS:REQUESTS[,…], got {text!r}") from None
    if not levels or any(c < 1 or n < 2 for c, n in levels):
        raise argparse.ArgumentTypeError(f"clients >= 1 and requests >= 2 per level: {text!r}")
    return levels


def add_parsers(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("bench", help="benchmarks (encoder, index, http, training, quantization, …)")
    benches = group.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)

    def bench(name: str, help: str, func, description: str | None = None) -> argparse.ArgumentParser:
        p = benches.add_parser(name, help=help, description=description or help)
        p.add_argument("--json", action="store_true", help="one JSON object on one line")
        p.set_defaults(func=func, log_level=logging.INFO, parser=p)
        return p

    p = bench(
        "match",
        "product matching across shops: Recall@1 image-only, text-only, fused (demo/food, 3 shops)",
        run_match,
    )
    p.add_argument(
        "--http", action="store_true", help="also text and hybrid /search latency, 1 and 4 clients"
    )
    p.add_argument(
        "--url", default=None, help="measure that running server (with the food demo domain) instead"
    )
    p.add_argument("--requests", type=int, default=60, help="requests per load level (default 60)")
    p.add_argument(
        "--group-scan",
        action="store_true",
        help="also /match/groups' scan speed (300 x 6,000 synthetic items)",
    )

    p = bench(
        "encoder",
        "encoder img/s: TF SavedModel, TFLite float32 and int8, batch 1 and 32; each domain's runtime",
        run_encoder,
    )
    p.add_argument("--seconds", type=float, default=8.0, help="per runtime and batch size (default 8)")
    p.add_argument("--quick", action="store_true", help="1.5 s per figure")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="TFLite threads of every runtime (default 0: every usable CPU); 1 measures a core's speed,"
        " which a loaded machine disturbs least",
    )
    p.add_argument(
        "--data",
        type=Path,
        action="append",
        default=[],
        help="a labelled folder to train (food's config, scratch store): its runtime decision; repeatable",
    )

    p = bench(
        "index",
        "FAISS index kinds on N clustered synthetic vectors: build, ms/query, recall@10, bytes/vector",
        run_index,
    )
    p.add_argument("-n", type=int, default=None, help="vectors (default 100,000; 20,000 with --quick)")
    p.add_argument(
        "--queries", type=int, default=None, help="held-out queries (default 300; 100 with --quick)"
    )
    p.add_argument(
        "--kinds",
        default="flat,hnsw,hnsw_fp16,ivfpq",
        help="comma-separated index kinds (auto: the policy's)",
    )
    p.add_argument("--quick", action="store_true", help="N = 20,000, 100 queries")

    bench(
        "limits",
        "the worst inputs under the limits, each sent once to a real server: status, peak RSS added, CPU s",
        run_limits,
    )
    p = bench(
        "soak",
        "thousands of searches mixed with bad inputs against one server: unexpected answers, RSS growth",
        run_soak,
    )
    p.add_argument("--searches", type=int, default=10_000)
    p.add_argument("--bad", type=int, default=500, help="bad requests mixed in (each must get a 4xx)")
    p.add_argument("--clients", type=int, default=4)

    p = bench(
        "catalog",
        "the living catalog at 100k items: upsert cost, search during changes, filtered recall",
        run_catalog,
    )
    p.add_argument("-n", type=int, default=None, help="catalog items (default 100,000; 20,000 with --quick)")
    p.add_argument(
        "--seconds", type=float, default=None, help="stream of changes (default 20; 6 with --quick)"
    )
    p.add_argument("--quick", action="store_true", help="N = 20,000, a shorter stream")

    p = bench(
        "http",
        "a real server: latency, req/s, batching, CPU per search; ratios against the encoder alone",
        run_http,
        description="Start `bentoml serve` on 127.0.0.1, time the served encoder alone in this process while "
        "the server is idle, then search with demo/food photos at 1, 4 and 16 clients. Prints latency, "
        "req/s, calls per model run (GET /stats), CPU ms per search per process, and the ratios: per-search "
        "overhead (p50 at 1 client - encoder ms per image; target <= 6 ms), req/s at 4 and 16 clients / "
        "the encoder's batch-1 img/s (targets >= 0.7, >= 0.8).",
    )
    p.add_argument(
        "--synthetic", type=int, default=0, metavar="N", help="serve one domain of N synthetic vectors"
    )
    p.add_argument("--domain", default="food", help="the store's domain to search (without --synthetic)")
    p.add_argument(
        "--levels",
        type=_levels,
        default=None,
        help="CLIENTS:REQUESTS per load level (default 1:300,4:600,16:800; --quick 1:40,4:80,16:120)",
    )
    p.add_argument(
        "--encoder-seconds", type=float, default=None, help="timing of the encoder alone (default 8; 2)"
    )
    p.add_argument("--starts", type=int, default=1, help="start the server this many times (startup figures)")
    p.add_argument("--quick", action="store_true", help="fewer requests, 2 s of encoder timing")
    p.add_argument(
        "--source",
        type=Path,
        default=None,
        help="serve another checkout's service.py and runners/ (e.g. an older commit, for before/after) "
        "with this environment",
    )

    p = bench("training", "training 1,000 images against encoding them once, side by side", run_training)
    p.add_argument("-n", type=int, default=1000, help="images (default 1000)")
    p.add_argument("--rounds", type=int, default=2, help="encode-once / train pairs (default 2)")

    p = bench(
        "quality",
        "retrieval quality on labelled photos: pretrained vs head-only vs the new fine-tuning",
        run_quality,
        description="Closed-set (stratified hold-out) and open-set (whole categories held out) Recall@1 "
        "with bootstrap intervals, Recall@5, mAP@R, and training seconds as a multiple of one encoding "
        "pass, for each --data folder of <category>/<image>.",
    )
    p.add_argument("--data", type=Path, action="append", required=True, help="a labelled folder (repeatable)")
    p.add_argument("--domain", default="food", help="domain whose training config is the base (default food)")
    p.add_argument("--holdout", type=float, default=0.3, help="closed-set hold-out fraction (default 0.3)")
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated, of pretrained,head-only,new (default) and preserve,blend-only,tail",
    )
    p.add_argument(
        "--splits",
        type=int,
        default=1,
        choices=range(1, 51),
        metavar="N",
        help="also the mean Recall@1 over N split seeds per method (default 1: the one split)",
    )

    p = bench("quantization", "the int8 study: speed, cosine to float32, hold-out Recall@1", run_quantization)
    p.add_argument("--seconds", type=float, default=4.0, help="per speed figure (default 4)")
    p.add_argument("--rounds", type=int, default=2)

    p = bench(
        "relevance", "/relevance's algorithm against the reference notebook's, same sites", run_relevance
    )
    p.add_argument("--data", type=Path, required=True, help="folder of <category>/<image>")
    p.add_argument("--domain", default="almonds-suppliers", help="domain config to train with")
    p.add_argument("--target", help="target label (default: the domain's target_label)")
    p.add_argument("--sites", type=int, default=40, help="synthetic sites, half relevant (default 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--reference",
        choices=("both", "savedmodel", "serving", "none"),
        default="both",
        help="run the reference as written (savedmodel: TF through hub), on the serving runtime, "
        "both (default) or not at all",
    )

    # Distributed builds and the per-replica memory (issue 17).
    p = bench(
        "build",
        "domain builds side by side on the same images: --engine local and --engine ray with 1, 2, … actors",
        run_build,
    )
    p.add_argument("--data", type=Path, help="folder of <category>/<image> (default: Fashion-MNIST, below)")
    p.add_argument(
        "--fashion-mnist",
        type=Path,
        default=None,
        help="write -n Fashion-MNIST photos as PNGs and build those: a .npz or the folder of Debian's "
        "dataset-fashion-mnist (default /usr/share/datasets/fashion-mnist)",
    )
    p.add_argument("-n", type=int, default=5000, help="images taken from Fashion-MNIST (default 5000)")
    p.add_argument("--engines", default="local,ray", help="comma-separated subset of local,ray")
    p.add_argument("--workers", default="1,2", help="Ray actor counts to compare (default 1,2)")
    p.add_argument("--shard-size", type=int, default=250)

    p = bench("replica", "memory of one serving replica per domain, by index kind, at N items", run_replica)
    p.add_argument("-n", type=int, default=100_000, help="items (default 100,000)")
    p.add_argument("--kinds", default="flat,hnsw,hnsw_fp16,ivfpq", help="comma-separated index kinds")
    p = bench(
        "duplicates",
        "copy vs look-alike on real photos: ours, cosine 0.9 (imagededup CNN), pHash, dHash; groups at scale",
        run_duplicates,
    )
    p.add_argument(
        "--data", type=Path, action="append", default=[], help="folder of <label>/<image> (repeatable)"
    )
    p.add_argument(
        "--originals", type=int, default=60, help="originals per folder, half calibrate, half test"
    )
    p.add_argument("--look-alikes", type=int, default=3, help="nearest same-label items per original")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--groups",
        type=int,
        default=0,
        metavar="N",
        help="also time the whole-catalog scan on N synthetic items",
    )

    from simserver.bench.suite import PARTS

    p = bench(
        "all",
        "several benchmarks side by side in one JSON object",
        run_all,
        description="encoder, search (http on N synthetic vectors), index, training, quantization, large "
        "(a measured 1M index): ~13 minutes in all; --quick: N = 20k, fewer requests, no quantization, "
        "no 1M.",
    )
    p.add_argument("--quick", action="store_true", help="N = 20,000, fewer requests, no 1M, no int8")
    p.add_argument("-n", type=int, default=None, help="synthetic vectors for the index and search parts")
    p.add_argument("--large", type=int, default=1_000_000, help="N of the measured large index (0: skip)")
    p.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} (default: all; --quick skips quantization, large)",
    )


def run_match(args: argparse.Namespace) -> int:
    from simserver.bench.match import build_set, http_latency, quality

    ti, info = build_set()
    out = {"set": info, "recall_at_1": quality(ti)}
    if args.group_scan:
        from simserver.bench.match import group_scan

        out["group_scan"] = group_scan()
    if args.http or args.url:
        out["http"] = http_latency(args.requests, args.url)
    print_json(out, args.json)
    return 0


def run_encoder(args: argparse.Namespace) -> int:
    from simserver.bench.encoder import encoder_figures

    seconds = 1.5 if args.quick else args.seconds
    print_json(encoder_figures(seconds, data=args.data, threads=args.threads), compact=args.json)
    return 0


def run_index(args: argparse.Namespace) -> int:
    from simserver.bench.index import index_figures

    n = args.n or (20_000 if args.quick else 100_000)
    queries = args.queries or (100 if args.quick else 300)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    print_json(index_figures(n, 1280, queries, kinds), compact=args.json)
    return 0


def run_limits(args: argparse.Namespace) -> int:
    from simserver.bench import limits
    from simserver.bench.common import BenchError

    try:
        result = limits.worst_inputs()
    except BenchError as exc:
        return fail(str(exc), status=1)
    print_json(result, compact=args.json)
    return 0


def run_soak(args: argparse.Namespace) -> int:
    from simserver.bench import limits
    from simserver.bench.common import BenchError

    try:
        result = limits.soak(searches=args.searches, bad=args.bad, clients=args.clients)
    except BenchError as exc:
        return fail(str(exc), status=1)
    print_json(result, compact=args.json)
    return 0 if result["errors"] == 0 else 1


def run_catalog(args: argparse.Namespace) -> int:
    from simserver.bench.catalog import catalog_figures

    n = args.n or (20_000 if args.quick else 100_000)
    seconds = args.seconds or (6.0 if args.quick else 20.0)
    print_json(catalog_figures(n, stream_seconds=seconds), compact=args.json)
    return 0


def run_http(args: argparse.Namespace) -> int:
    from simserver.bench import http
    from simserver.bench.common import BenchError

    levels = args.levels or (http.QUICK_LEVELS if args.quick else http.LEVELS)
    seconds = args.encoder_seconds or (2.0 if args.quick else 8.0)
    try:
        result = http.http_figures(
            synthetic=args.synthetic,
            domain=args.domain,
            levels=levels,
            encoder_seconds=seconds,
            starts=args.starts,
            source=args.source,
        )
    except (BenchError, FileNotFoundError) as exc:
        return fail(str(exc), status=1)
    if args.json:
        print_json(result, compact=True)
    else:
        print_http(result)
    return 0


def print_http(result: dict) -> None:
    """The figures as the README tables show them, then the ratios with their targets."""
    d = result["domain"]
    kind = f", {d['index_kind']}" if "index_kind" in d else ""
    startups = ", ".join(f"{s} s" for s in result["startup_s"])
    q = result["queries"]
    print(
        f"domain {d['name']} ({d.get('count')} items{kind}); queries: {q['images']} demo/{q['domain']} "
        f"photos; startup {startups}"
    )
    enc = result["encoder_alone"]
    print(
        f"encoder alone ({enc['runtime']}, {enc['threads']} threads, this process, server idle): "
        f"{enc['img_per_s_batch_1']} img/s at batch 1, {enc['ms_per_image_p50']} ms per image (p50)"
    )
    levels = [v for k, v in result.items() if k.endswith("_clients")]
    roles = sorted({r for v in levels for r in v["cpu_ms_per_request"]})
    head = ["clients", "requests", "errors", "p50 ms", "p95 ms", "p99 ms", "req/s", "calls/run"]
    print(" | ".join(head + [f"CPU ms/req {r}" for r in roles]))
    for v in levels:
        cells = [v["clients"], v["requests"], v["errors"], v["p50_ms"], v["p95_ms"], v["p99_ms"], v["rps"]]
        cells.append(v["encoder_batching"]["mean_calls_per_run"])
        cells += [v["cpu_ms_per_request"].get(r, "-") for r in roles]
        print(" | ".join(str(c) for c in cells))
    rss = result["rss_mb_after_load"]
    print("RSS after load (MB): " + ", ".join(f"{k} {v:,.0f}" for k, v in rss.items()))
    print(f"SIGTERM to exit: {result['sigterm_exit_s']} s")
    print("ratios (measured side by side in this run):")
    for name, r in result["ratios"].items():
        verdict = "n/a" if r["met"] is None else ("met" if r["met"] else "NOT met")
        print(f"  {name} = {r['value']}  (target {r['target']}: {verdict}) - {r['what']}")


def run_training(args: argparse.Namespace) -> int:
    from simserver.bench.training import training_figures

    print_json(training_figures(args.n, args.rounds), compact=args.json)
    return 0


def run_quality(args: argparse.Namespace) -> int:
    from simserver.bench.quality import METHODS, print_quality, quality_figures

    methods = args.methods.split(",") if args.methods else None
    unknown = sorted(set(methods or []) - set(METHODS))
    if unknown:
        args.parser.error(f"unknown methods: {', '.join(unknown)} (known: {', '.join(METHODS)})")
    missing = [str(d) for d in args.data if not d.is_dir()]
    if missing:
        args.parser.error(f"not a folder: {', '.join(missing)}")
    result = quality_figures(args.data, args.domain, args.holdout, methods, args.splits)
    if args.json:
        print_json(result, compact=True)
    else:
        print_quality(result)
    return 0


def run_quantization(args: argparse.Namespace) -> int:
    from simserver.bench.quantization import quantization_figures

    print_json(quantization_figures(args.seconds, args.rounds), compact=args.json)
    return 0


def run_duplicates(args: argparse.Namespace) -> int:
    from simserver.bench.duplicates import duplicates_figures, groups_figures, table

    if not args.data and not args.groups:
        return fail("give --data DIR (real photos) and/or --groups N (the scan at scale)")
    for d in args.data:
        if not Path(d).is_dir():
            return fail(f"--data {d}: not a folder")
    out: dict = {
        "sets": [duplicates_figures(d, args.originals, args.look_alikes, args.seed) for d in args.data]
    }
    if args.groups:
        out["groups"] = groups_figures(args.groups)
    if args.json:
        print_json(out, compact=True)
    else:
        for r in out["sets"]:
            print(table(r))
        if "groups" in out:
            print_json(out["groups"])
    return 0


def run_relevance(args: argparse.Namespace) -> int:
    from simserver.bench.common import BenchError
    from simserver.bench.relevance import relevance_figures

    runtimes = {"both": ("savedmodel", "serving"), "none": ()}.get(args.reference, (args.reference,))
    try:
        result = relevance_figures(args.data, args.domain, args.target, args.sites, args.seed, runtimes)
    except (BenchError, FileNotFoundError) as exc:
        return fail(str(exc), status=1)
    print_json(result, compact=args.json)
    return 0


def run_all(args: argparse.Namespace) -> int:
    from simserver.bench.suite import run_suite

    try:
        result = run_suite(args.parts.split(","), quick=args.quick, n=args.n, large=args.large)
    except ValueError as exc:
        args.parser.error(str(exc))
    print_json(result, compact=args.json)
    return 0


def run_build(args: argparse.Namespace) -> int:
    import tempfile

    from simserver.bench.build import FASHION_MNIST, build_figures, write_fashion_mnist

    engines = {e.strip() for e in args.engines.split(",") if e.strip()}
    if not engines or engines - {"local", "ray"}:
        args.parser.error(f"--engines: a subset of local,ray, got {args.engines!r}")
    try:
        workers = [int(w) for w in args.workers.split(",")] if "ray" in engines else []
    except ValueError:
        args.parser.error(f"--workers: comma-separated counts, got {args.workers!r}")
    if any(w < 1 for w in workers) or (args.data and args.fashion_mnist):
        args.parser.error("give --data or --fashion-mnist (not both), and workers >= 1")
    with tempfile.TemporaryDirectory(prefix="bench-build-images-") as tmp:
        data = args.data or write_fashion_mnist(args.fashion_mnist or FASHION_MNIST, args.n, Path(tmp))
        if not data.is_dir():
            args.parser.error(f"not a folder: {data}")
        print_json(build_figures(data, workers, args.shard_size, "local" in engines), compact=args.json)
    return 0


def run_replica(args: argparse.Namespace) -> int:
    from simserver.bench.replica import replica_memory

    print_json(
        replica_memory(args.n, [k.strip() for k in args.kinds.split(",") if k.strip()]), compact=args.json
    )
    return 0
