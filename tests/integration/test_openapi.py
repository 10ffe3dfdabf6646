"""The served OpenAPI document matches the server: every operation fuzzed by schemathesis with all
its checks against the session's real `bentoml serve`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

# Every check runs (schemathesis's default). positive_data_acceptance accepts a 400/413 on the
# operations that take files or filters, whose validity a schema cannot state (see schemathesis.toml).
CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, demo_store, domains_dir, builtin_tag):
    """A server of its own on a copy of the demo store: the fuzz calls every route, the catalog's
    deletions included, which must not reach the session's store."""
    from tests.integration.conftest import Server, server_env

    tmp = tmp_path_factory.mktemp("openapi")
    shutil.copytree(demo_store, tmp / "store")
    srv = Server(server_env(tmp / "store", domains_dir, tmp), tmp / "server.log")
    srv.wait_ready()
    yield srv
    srv.stop()


def test_the_document_declares_path_parameters_errors_and_task_shapes(fuzzed):
    server = fuzzed
    spec = requests.get(f"{server.url}/docs.json", timeout=30).json()
    assert spec["components"]["schemas"]["Error"]["required"] == ["error"]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if "{domain}" in path:
                domain = next(p for p in op["parameters"] if p["name"] == "domain")
                assert (
                    domain["in"] == "path"
                    and "fashion" in domain["schema"]["enum"]
                    or path.endswith("/relevance")
                    or "/match" in path  # /match, /match/groups and its task: text domains only
                ), (method, path)
            for code, reply in op["responses"].items():
                if code.startswith(("4", "5")):
                    assert reply["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"
                    }, (method, path, code)
    relevance = spec["paths"]["/{domain}/relevance"]["post"]["parameters"][0]["schema"]["enum"]
    assert relevance == ["almonds-suppliers"]  # the only demo domain with a target label
    match = spec["paths"]["/{domain}/match"]["post"]["parameters"][0]["schema"]["enum"]
    assert match == ["food", "shops"]  # text configured: the food demo, conftest's shops
    assert "put" not in spec["paths"].get("/{domain}/train/cancel", {})
    assert "put" not in spec["paths"].get("/{domain}/match/groups/cancel", {})
    assert "post" in spec["paths"]["/{domain}/match/groups/submit"]
    status = spec["components"]["schemas"]["TaskStatusResponse"]["properties"]["status"]["enum"]
    assert {"completed", "failed"} <= set(status)
    submitted = spec["paths"]["/{domain}/train/submit"]["post"]["responses"]["200"]
    assert submitted["content"]["application/json"]["schema"]["$ref"].endswith("/TaskSubmitted")
    # A BentoML API sharing its path with a FastAPI route is documented too.
    assert {"get", "post"} <= set(spec["paths"]["/{domain}/items"])
    assert spec["paths"]["/{domain}/train/submit"]["post"]["requestBody"]["required"] is True
    # A 405 names every method of the path (Starlette's named the first route's only), in the error shape.
    r = requests.options(f"{server.url}/fashion/items/a/b.png", timeout=30)
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET", r.headers
    assert "error" in r.json() and "detail" not in r.json()


def test_schemathesis_finds_no_failure(fuzzed, tmp_path):
    server = fuzzed
    cmd = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file",
        str(CONFIG),
        "run",
        f"{server.url}/docs.json",
        # No --checks: every check runs by default, and a CLI --checks would override the
        # per-operation settings of schemathesis.toml (CLI options take precedence over them).
        "--max-examples",
        "25",
        "--seed",
        "20261201",
        "--workers",
        "2",
        "--request-timeout",
        "60",
        "--suppress-health-check",
        "all",
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    # CPython 3.11's AST constructor can leave its recursion counter wrong after an error
    # (python/cpython#106905, fixed in later releases): hypothesis then fails to parse a lambda's
    # source in schemathesis' own generator with "AST constructor recursion depth mismatch", an
    # interpreter fault, not a finding about this API. Only that is retried, once, in one worker.
    if run.returncode != 0 and "AST constructor recursion depth mismatch" in run.stdout + run.stderr:
        i = cmd.index("--workers")
        cmd[i + 1] = "1"
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    summary = run.stdout[-6000:]
    assert run.returncode == 0, summary
    assert " passed" in summary and "failures" not in summary.split("SUMMARY")[-1].lower(), summary
