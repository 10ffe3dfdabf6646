"""The served OpenAPI document matches the server: every operation fuzzed by schemathesis with all
its checks (one excluded, see below) against the session's real `bentoml serve`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

# positive_data_acceptance expects any schema-valid body to be accepted; a schema cannot say "a
# decodable image" or "a zip of <category>/<image>", so random bytes in a file field are 400s here.
# allow_header_conformance checks a 405's Allow header: Starlette lists only the first route of a
# path (GET /{domain}/items/{id} and DELETE are two FastAPI routes), so OPTIONS says "Allow: GET".
# unsupported_method: BentoML's document keeps one operation of a path that a BentoML API and a
# FastAPI route share (POST and GET /{domain}/items): the POST is missing from it (#19, open).
EXCLUDED_CHECKS = "positive_data_acceptance,allow_header_conformance,unsupported_method"


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
                ), (method, path)
            for code, reply in op["responses"].items():
                if code.startswith(("4", "5")):
                    assert reply["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"
                    }, (method, path, code)
    relevance = spec["paths"]["/{domain}/relevance"]["post"]["parameters"][0]["schema"]["enum"]
    assert relevance == ["almonds-suppliers"]  # the only demo domain with a target label
    assert "put" not in spec["paths"].get("/{domain}/train/cancel", {})
    status = spec["components"]["schemas"]["TaskStatusResponse"]["properties"]["status"]["enum"]
    assert {"completed", "failed"} <= set(status)
    submitted = spec["paths"]["/{domain}/train/submit"]["post"]["responses"]["200"]
    assert submitted["content"]["application/json"]["schema"]["$ref"].endswith("/TaskSubmitted")


def test_schemathesis_finds_no_failure(fuzzed, tmp_path):
    server = fuzzed
    cmd = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{server.url}/docs.json",
        "--checks",
        "all",
        "--exclude-checks",
        EXCLUDED_CHECKS,
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
    summary = run.stdout[-6000:]
    assert run.returncode == 0, summary
    assert " passed" in summary and "failures" not in summary.split("SUMMARY")[-1].lower(), summary
