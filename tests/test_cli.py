"""scripts/build_domain.py and scripts/query.py, run as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import DEMO, ROOT

pytestmark = pytest.mark.slow


def run(args: list[str], store, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "STORE_URI": f"file://{store}", **env},
    )


def test_build_from_zip_then_query(tmp_path, builtin_tag):
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for label in ("boot", "dress", "ring"):
            for p in (DEMO / "fashion" / label).iterdir():
                zf.write(p, f"{label}/{p.name}")
        zf.writestr("ring/bad.png", b"not really a png")
    store = tmp_path / "store"
    built = run(["scripts/build_domain.py", "fashion", "--data", str(archive)], store)
    assert built.returncode == 0, built.stderr
    report = json.loads(built.stdout.strip().splitlines()[-1])
    assert report["indexed"] == 9 and report["labels"] == {"boot": 3, "dress": 3, "ring": 3}
    assert report["skipped"] == [{"name": "ring/bad.png", "reason": "not an image (unrecognised format)"}]
    assert "encode" in built.stderr  # the progress bar

    q = run(["scripts/query.py", "fashion", str(DEMO / "fashion/ring/google.png"), "--top-k", "2"], store)
    assert q.returncode == 0, q.stderr
    out = json.loads(q.stdout)
    assert out["version"] == report["version"]
    assert [h["label"] for h in out["results"]] == ["ring", "ring"]
    assert out["results"][0]["name"] == "ring/google.png"


def test_cli_errors_are_clear(tmp_path, builtin_tag):
    store = tmp_path / "store"
    q = run(["scripts/query.py", "fashion", str(DEMO / "fashion/ring/google.png")], store)
    assert q.returncode == 2 and "no index yet" in q.stderr
    (tmp_path / "empty").mkdir()
    b = run(["scripts/build_domain.py", "fashion", "--data", str(tmp_path / "empty")], store)
    assert b.returncode == 2 and "no usable image" in b.stderr
