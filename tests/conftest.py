"""Shared by every test: paths, a quiet environment, and the test pyramid's marks.

``tests/unit/`` mirrors the package and needs neither TensorFlow nor a server; ``tests/gateway/``
runs the HTTP gateway in-process with fake services; ``tests/integration/`` starts real servers
(``bentoml serve``, moto) and builds real models, and is marked ``slow`` here, automatically.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo"
TEST_DATA = Path(__file__).resolve().parent / "data"

os.environ.setdefault("BENTOML_HOME", str(ROOT / "var" / "bentoml"))
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

INTEGRATION = Path(__file__).resolve().parent / "integration"


@pytest.fixture(autouse=True)
def _logging_restored():
    """A test that runs the CLI's ``main`` in-process points the root logger at that test's
    captured stderr (and the project's loggers at INFO); a later test would log into the closed
    stream ("--- Logging error ---" in its stderr), so both are put back after every test."""
    import logging

    root, ours = logging.getLogger(), logging.getLogger("simserver")
    handlers, root_level, our_level = root.handlers[:], root.level, ours.level
    yield
    root.handlers[:] = handlers
    root.setLevel(root_level)
    ours.setLevel(our_level)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.slow)
