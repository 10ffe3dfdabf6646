"""Query a domain's current index without the server.

python scripts/query.py fashion demo/fashion/dress/google.png --top-k 3
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simserver.domain_config import load_domains  # noqa: E402
from simserver.encoder_pool import EncoderPool  # noqa: E402
from simserver.errors import ClientError  # noqa: E402
from simserver.preprocess import prepare  # noqa: E402
from simserver.repository import Repository  # noqa: E402
from simserver.settings import get_settings  # noqa: E402
from simserver.store import open_store  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("domain")
    ap.add_argument("image", type=Path)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--store", help="STORE_URI override")
    args = ap.parse_args()
    settings = get_settings()
    domains = load_domains(settings.domains_dir)
    cfg = domains.get(args.domain)
    if cfg is None:
        ap.error(f"unknown domain {args.domain!r} (known: {', '.join(domains)})")
    store = open_store(args.store or settings.store_uri, settings.store_cache_dir)
    repo = Repository(store)
    version = repo.current_version(cfg.name)
    if version is None:
        print(f"error: domain {cfg.name} has no index yet (scripts/build_domain.py)", file=sys.stderr)
        return 2
    index = repo.load(cfg.name, version)
    try:
        pixels = prepare(args.image.read_bytes(), 224, cfg.limits.max_image_pixels, str(args.image))
    except ClientError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    pool = EncoderPool.from_settings(settings, store=store)
    # A fine-tuned version brings its own encoder: queries must use the version's, not the yaml's.
    vector = pool.get(index.meta.get("encoder") or cfg.encoder).encode(pixels[None])[0]
    hits = index.search(vector, args.top_k or cfg.top_k)
    print(
        json.dumps({"domain": cfg.name, "version": version, "results": [asdict(h) for h in hits]}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
