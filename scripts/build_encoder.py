"""Build the built-in EfficientNet-Lite0 encoder into the BentoML model store (idempotent)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simserver.encoder import build_builtin  # noqa: E402
from simserver.settings import get_settings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--force", action="store_true", help="rebuild even if the model store has it")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tag = build_builtin(get_settings().builtin_model, force=args.force)
    print(tag)


if __name__ == "__main__":
    main()
