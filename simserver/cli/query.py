"""``simserver query``: search a domain's current version without the server."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from simserver.cli.common import HelpFormatter, fail

logger = logging.getLogger(__name__)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "query",
        help="search a domain's current index with one image (no server)",
        description="Encode IMAGE with the encoder of the version being served (fine-tuned or not) and "
        "print its nearest items as JSON, as POST /{domain}/search answers.",
        epilog="example:\n  simserver query fashion demo/fashion/dress/google.png --top-k 3",
        formatter_class=HelpFormatter,
    )
    p.add_argument("domain")
    p.add_argument("image", type=Path)
    p.add_argument("--top-k", type=int, default=None, help="results (default: the domain's top_k)")
    p.add_argument("--store", help="STORE_URI override")
    p.set_defaults(func=query, log_level=logging.WARNING, parser=p)


def query(args: argparse.Namespace) -> int:
    import anyio
    import numpy as np

    from simserver.domain_config import load_domains
    from simserver.encoder_pool import EncoderPool
    from simserver.errors import RequestRefused
    from simserver.preprocess import prepare
    from simserver.repository import Repository
    from simserver.searcher import Searcher
    from simserver.settings import get_settings
    from simserver.store import open_store

    settings = get_settings()
    domains = load_domains(settings.domains_dir)
    if args.domain not in domains:
        args.parser.error(f"unknown domain {args.domain!r} (known: {', '.join(domains)})")
    cfg = domains[args.domain]
    if args.top_k is not None and args.top_k < 1:
        args.parser.error("--top-k must be at least 1")
    store = open_store(args.store or settings.store_uri, settings.store_cache_dir)
    repo = Repository(store)
    version = repo.current_version(cfg.name)
    if version is None:
        return fail(f"domain {cfg.name} has no index yet (simserver domain build {cfg.name} --data …)")
    index = repo.load(cfg.name, version)
    try:
        pixels = prepare(args.image.read_bytes(), 224, cfg.limits.max_image_pixels, str(args.image))
    except OSError as exc:
        return fail(f"cannot read {args.image}: {exc.strerror or exc}")
    except RequestRefused as exc:
        return fail(exc.message)
    pool = EncoderPool.from_settings(settings, store=store)

    async def encode(images: np.ndarray, encoder: str) -> np.ndarray:
        return pool.get(encoder).encode(images)

    # The searcher picks the encoder of the version it searches (a fine-tuned version brings its own).
    searcher = Searcher(cfg, current=lambda: index, encode=encode)
    try:
        reply = anyio.run(searcher.search, pixels, args.top_k or cfg.top_k)
    except RequestRefused as exc:
        return fail(exc.message)
    print(reply.model_dump_json(indent=2))
    return 0
