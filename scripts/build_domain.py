"""Train a domain from a folder or zip of <category>/<image>, without the server: backbone
features, fine-tuning and hold-out evaluation (see --mode), index, publish.

python scripts/build_domain.py fashion --data demo/fashion
python scripts/build_domain.py fashion --data demo/fashion --mode pretrained
python scripts/build_domain.py --demo --missing-only     # every domain's demo data, if unbuilt
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

from simserver.domain_config import load_domains  # noqa: E402
from simserver.encoder_pool import EncoderPool, LocalBackend  # noqa: E402
from simserver.errors import ClientError  # noqa: E402
from simserver.ingest import count_entries, read_folder, read_zip  # noqa: E402
from simserver.repository import Repository  # noqa: E402
from simserver.settings import get_settings  # noqa: E402
from simserver.store import open_store  # noqa: E402
from simserver.training import FeatureCache, train_domain  # noqa: E402


def build_one(repo: Repository, cfg, data: Path, pool: EncoderPool, mode: str | None) -> dict:
    settings = get_settings()
    backend = LocalBackend(pool, cfg.encoder)  # loads the encoder: not part of the training's time
    t0 = time.perf_counter()
    total = count_entries(data)
    with tqdm(total=total, desc=f"{cfg.name}: read", unit="img", file=sys.stderr) as bar:
        if data.is_dir():
            dataset = read_folder(data, cfg.limits, progress=bar.update)
        else:
            dataset = read_zip(data.read_bytes(), cfg.limits, progress=bar.update)
    with tqdm(total=len(dataset.samples), desc=f"{cfg.name}: encode", unit="img", file=sys.stderr) as bar:

        def progress(n: int) -> None:
            # Augmented views are encoded after the images: grow the bar instead of overflowing it.
            if bar.n + n > bar.total:
                bar.total = bar.n + n
            bar.update(n)

        report = train_domain(
            repo,
            cfg,
            dataset,
            backend,
            mode=mode,
            cache=FeatureCache(settings.store_cache_dir, backend.encoder_id),
            batch_size=settings.encode_batch_size,
            progress=progress,
            started=t0,
        )
    return report.as_json()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("domain", nargs="?", help="domain name (domains/<name>.yaml)")
    ap.add_argument("--data", type=Path, help="folder or .zip of <category>/<image>")
    ap.add_argument("--demo", action="store_true", help="build every domain from its demo_data")
    ap.add_argument("--missing-only", action="store_true", help="skip domains the store already has")
    ap.add_argument("--store", help="STORE_URI override")
    ap.add_argument(
        "--mode",
        choices=("auto", "finetune", "pretrained"),
        help="auto: fine-tune, promote only if better on the hold-out (default: the domain's training.mode)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    store = open_store(args.store or settings.store_uri, settings.store_cache_dir)
    repo = Repository(store)
    domains = load_domains(settings.domains_dir)
    if args.demo:
        jobs = [(cfg, cfg.demo_path()) for cfg in domains.values() if cfg.demo_path()]
    else:
        if args.domain not in domains or args.data is None:
            ap.error(f"give a known domain ({', '.join(domains)}) and --data, or --demo")
        jobs = [(domains[args.domain], args.data)]
    pool = EncoderPool.from_settings(settings, store=store)
    for cfg, data in jobs:
        if args.missing_only and repo.current_version(cfg.name):
            print(json.dumps({"domain": cfg.name, "version": repo.current_version(cfg.name), "built": False}))
            continue
        try:
            report = build_one(repo, cfg, Path(data), pool, args.mode)
        except ClientError as exc:
            print(f"error: {cfg.name}: {exc.message}", file=sys.stderr)
            return 2
        except (OSError, zipfile.BadZipFile) as exc:
            print(f"error: {cfg.name}: cannot read {data}: {exc}", file=sys.stderr)
            return 2
        print(json.dumps({"domain": cfg.name, "built": True, **report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
