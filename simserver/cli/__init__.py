"""The ``simserver`` command: one entry point, one module per command group.

    simserver encoder build              the built-in encoder into the BentoML model store
    simserver domain build               train a domain from a folder or zip (or every demo domain)
    simserver query                      search a domain's current version with one image
    simserver evaluate                   pretrained vs fine-tuned on a labelled set, HTML report
    simserver bench …                    benchmarks: encoder, index, http, training, quantization,
                                         relevance, all
    simserver deploy aws                 create or update the CloudFormation stack
    simserver bento export               the Bento, its archive and a Docker build context

plus the HTTP client's commands (:mod:`simserver.cli.remote`) when that module is present. Each
group module has ``add_parsers(subparsers)``; a command is ``args.func(args) -> exit status``.
Heavy imports (TensorFlow, FAISS, BentoML, boto3) happen inside the commands, so ``--help`` is quick.
"""

from __future__ import annotations

import argparse
import logging
import sys
from types import ModuleType

from simserver.cli import bench, deploy, domain, encoder, evaluate, query
from simserver.cli.common import environment_defaults, setup_logging

logger = logging.getLogger(__name__)

remote: ModuleType | None
try:  # the HTTP client's commands (another module, landing separately)
    from simserver.cli import remote
except ImportError as exc:
    # Only the module's own absence is expected; a broken import inside it must show.
    if exc.name != "simserver.cli.remote":
        raise
    remote = None

GROUPS = [encoder, domain, query, evaluate, bench, deploy]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simserver",
        description="Image-similarity server: build encoders and domains, query, evaluate, benchmark, "
        "deploy. `simserver COMMAND --help` for each command. Serving itself is `make run` (bentoml serve).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs, and other libraries' info")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in [*GROUPS, *([remote] if remote is not None else [])]:
        group.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    environment_defaults()
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "log_level", logging.WARNING), args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
