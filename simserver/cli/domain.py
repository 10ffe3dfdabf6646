"""``simserver domain build``: train a domain from a folder or zip without the server."""

from __future__ import annotations

import argparse
import json
import logging
import time
import zipfile
from pathlib import Path
from typing import get_args

from simserver.cli.common import HelpFormatter, fail, progress_bar
from simserver.finetune import TrainingMode

logger = logging.getLogger(__name__)

MODES = get_args(TrainingMode)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("domain", help="build domains without the server").add_subparsers(
        dest="domain_command", metavar="COMMAND", required=True
    )
    p = group.add_parser(
        "build",
        help="train a domain from a folder or .zip of <category>/<image> (or every demo domain)",
        description="Backbone features, fine-tuning and hold-out evaluation (see --mode), index, publish: "
        "the same pipeline as POST /{domain}/train. Prints one JSON line per domain.",
        epilog="examples:\n"
        "  simserver domain build fashion --data demo/fashion\n"
        "  simserver domain build fashion --data set.zip --mode pretrained\n"
        "  simserver domain build --demo --missing-only     # every domain's demo data, if unbuilt",
        formatter_class=HelpFormatter,
    )
    p.add_argument("domain", nargs="?", help="domain name (domains/<name>.yaml)")
    p.add_argument(
        "--data", help="folder or .zip of <category>/<image> (--engine ray: a folder or s3://bucket/prefix/)"
    )
    p.add_argument("--demo", action="store_true", help="build every domain from its demo_data")
    p.add_argument("--missing-only", action="store_true", help="skip domains the store already has")
    p.add_argument("--store", help="STORE_URI override")
    p.add_argument(
        "--mode",
        choices=MODES,
        help="auto: fine-tune, promote only if better on the hold-out (default: the domain's training.mode)",
    )
    # Distributed builds (simserver/distributed.py).
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="ray: decode + encode in Ray Data actors, Parquet shards in the store, resumable "
        "(indexes with the pretrained encoder)",
    )
    p.add_argument(
        "--address", help="--engine ray: join this Ray cluster (default: start one on this machine)"
    )
    p.add_argument("--workers", type=int, help="--engine ray: encoder actors (default: one per CPU)")
    p.add_argument("--shard-size", type=int, default=500, help="--engine ray: images per Parquet shard")
    p.set_defaults(func=build, log_level=logging.WARNING, parser=p)


def build_one(repo, cfg, data: Path, pool, mode: str | None) -> dict:
    """Read, train, publish one domain; the training's report as JSON."""
    from simserver.encoder_pool import LocalBackend
    from simserver.features import FeatureCache
    from simserver.ingest import count_entries, read_folder, read_zip
    from simserver.settings import get_settings
    from simserver.training import train_domain

    settings = get_settings()
    backend = LocalBackend(pool, cfg.encoder)  # loads the encoder: not part of the training's time
    t0 = time.perf_counter()
    with progress_bar(count_entries(data), f"{cfg.name}: read") as advance:
        if data.is_dir():
            dataset = read_folder(data, cfg.limits, progress=advance)
        else:
            dataset = read_zip(data.read_bytes(), cfg.limits, progress=advance)
    with progress_bar(len(dataset.samples), f"{cfg.name}: encode") as advance:
        report = train_domain(
            repo,
            cfg,
            dataset,
            backend,
            mode=mode,
            cache=FeatureCache(settings.store_cache_dir, backend.encoder_id),
            batch_size=settings.encode_batch_size,
            progress=advance,
            started=t0,
        )
    return report.as_json()


def build(args: argparse.Namespace) -> int:
    from simserver.domain_config import load_domains
    from simserver.encoder_pool import EncoderPool
    from simserver.errors import RequestRefused
    from simserver.repository import Repository
    from simserver.settings import get_settings
    from simserver.store import open_store

    settings = get_settings()
    store = open_store(args.store or settings.store_uri, settings.store_cache_dir)
    repo = Repository(store)
    domains = load_domains(settings.domains_dir)
    if args.demo:
        jobs = [(cfg, demo) for cfg in domains.values() if (demo := cfg.demo_path())]
    else:
        if args.domain not in domains or args.data is None:
            args.parser.error(f"give a known domain ({', '.join(domains)}) and --data, or --demo")
        jobs = [(domains[args.domain], args.data)]
    if args.engine == "ray":
        if args.mode not in (None, "pretrained"):
            args.parser.error(
                "--engine ray indexes with the pretrained encoder: give no --mode or pretrained"
            )
        return build_ray(args, repo, jobs, args.store or settings.store_uri)
    pool = EncoderPool.from_settings(settings, store=store)
    for cfg, data in jobs:
        current = repo.current_version(cfg.name)
        if args.missing_only and current:
            print(json.dumps({"domain": cfg.name, "version": current, "built": False}))
            continue
        try:
            report = build_one(repo, cfg, Path(data), pool, args.mode)
        except RequestRefused as exc:
            return fail(f"{cfg.name}: {exc.message}")
        except (OSError, zipfile.BadZipFile) as exc:
            return fail(f"{cfg.name}: cannot read {data}: {exc}")
        print(json.dumps({"domain": cfg.name, "built": True, **report}))
    return 0


def build_ray(args: argparse.Namespace, repo, jobs: list, store_uri: str) -> int:
    """``--engine ray``: each domain built by :func:`simserver.distributed.build_on_ray`."""
    from simserver.distributed import RayOptions, build_on_ray
    from simserver.errors import RequestRefused

    if args.workers is not None and args.workers < 1 or args.shard_size < 1:
        args.parser.error("--workers and --shard-size must be at least 1")
    options = RayOptions(args.address, args.workers, args.shard_size)
    for cfg, data in jobs:
        current = repo.current_version(cfg.name)
        if args.missing_only and current:
            print(json.dumps({"domain": cfg.name, "version": current, "built": False}))
            continue
        with progress_bar(0, f"{cfg.name}: encode (ray)") as advance:
            try:
                report = build_on_ray(repo, cfg, str(data), store_uri, options, advance)
            except RequestRefused as exc:
                return fail(f"{cfg.name}: {exc.message}")
            except OSError as exc:
                return fail(f"{cfg.name}: cannot read {data}: {exc}")
        print(
            json.dumps({"domain": cfg.name, "built": True, **report.as_json(), "build": report.meta["build"]})
        )
    return 0
