"""What the command modules share: environment defaults, logging, progress bars, error exits."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from simserver.settings import PROJECT_ROOT

logger = logging.getLogger(__name__)

# Exit statuses: 0 done, 1 failed (the world said no: AWS, bentoml build), 2 bad input or arguments.
FAILED = 1
BAD_INPUT = 2


def environment_defaults() -> None:
    """As the Makefile sets them, for a command run by hand: the project's BentoML model store (where
    `simserver encoder build` puts the encoder and the server looks for it), no BentoML telemetry, and
    TensorFlow's C++ INFO lines off. Explicit environment variables win."""
    os.environ.setdefault("BENTOML_HOME", str(PROJECT_ROOT / "var" / "bentoml"))
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class _Formatter(logging.Formatter):
    """The project's INFO lines are progress for a person ("validating stack.yaml"): message only.
    Everything else (warnings, other libraries) says its level and logger."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO and record.name.startswith("simserver"):
            return record.getMessage()
        return f"{record.levelname} {record.name}: {record.getMessage()}"


def setup_logging(level: int, verbose: bool = False) -> None:
    """Logs go to stderr (stdout carries the command's result, often JSON). ``level``: the project's
    own loggers; other libraries only warn, unless ``verbose``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("simserver").setLevel(logging.DEBUG if verbose else level)


class HelpFormatter(argparse.HelpFormatter):
    """Descriptions wrapped to the terminal; an epilog of examples kept line by line, as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def fail(message: str, status: int = BAD_INPUT) -> int:
    """Print ``error: message`` on stderr; returns the exit status for the command to return."""
    print(f"error: {message}", file=sys.stderr)
    return status


def print_json(obj: Any, compact: bool = False) -> None:
    print(json.dumps(obj) if compact else json.dumps(obj, indent=2))


@contextmanager
def progress_bar(total: int, desc: str, unit: str = "img") -> Iterator[Callable[[int], None]]:
    """A tqdm bar on stderr; yields ``advance(n)``, the progress callback the library functions take."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr) as bar:

        def advance(n: int) -> None:
            # A training encodes augmented views after the images: grow the bar instead of overflowing it.
            if bar.n + n > bar.total:
                bar.total = bar.n + n
            bar.update(n)

        yield advance
