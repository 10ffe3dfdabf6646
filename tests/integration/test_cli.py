"""The `simserver` command (domain build, query, evaluate), run as a user would: in a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.integration.conftest import DEMO, ROOT

# `python -m simserver.cli` is the console script's code without depending on how it was installed;
# test_console_script_lists_every_command checks the installed `simserver` itself.
CLI = [sys.executable, "-m", "simserver.cli"]


def run(args: list[str], store, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args],
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
    built = run(["domain", "build", "fashion", "--data", str(archive)], store)
    assert built.returncode == 0, built.stderr
    report = json.loads(built.stdout.strip().splitlines()[-1])
    assert report["indexed"] == 9 and report["labels"] == {"boot": 3, "dress": 3, "ring": 3}
    assert report["skipped"] == [{"name": "ring/bad.png", "reason": "not an image (unrecognised format)"}]
    assert "encode" in built.stderr  # the progress bar

    q = run(["query", "fashion", str(DEMO / "fashion/ring/google.png"), "--top-k", "2"], store)
    assert q.returncode == 0, q.stderr
    out = json.loads(q.stdout)
    assert out["version"] == report["version"]
    assert [h["label"] for h in out["results"]] == ["ring", "ring"]
    assert out["results"][0]["name"] == "ring/google.png"


def test_cli_errors_are_clear(tmp_path, builtin_tag):
    store = tmp_path / "store"
    q = run(["query", "fashion", str(DEMO / "fashion/ring/google.png")], store)
    assert q.returncode == 2 and "no index yet" in q.stderr
    (tmp_path / "empty").mkdir()
    b = run(["domain", "build", "fashion", "--data", str(tmp_path / "empty")], store)
    assert b.returncode == 2 and "no usable image" in b.stderr


def test_finetune_mode_then_query_uses_the_versions_encoder(tmp_path, builtin_tag):
    from simserver.int8 import float_name

    store = tmp_path / "store"
    built = run(["domain", "build", "fashion", "--data", str(DEMO / "fashion"), "--mode", "finetune"], store)
    assert built.returncode == 0, built.stderr
    report = json.loads(built.stdout.strip().splitlines()[-1])
    ev = report["evaluation"]
    # Its float32 or int8 runtime (the hold-out decides, README "Encoder runtime"): the same tar.
    tar = float_name(report["encoder"]).removeprefix("store:")
    assert ev["promoted"] and ev["mode"] == "finetune" and tar.startswith("domains/fashion/versions/")
    assert ev["finetuned"]["recall_at_1"] > ev["pretrained"]["recall_at_1"]
    meta = json.loads((store / "domains/fashion/versions" / report["version"] / "meta.json").read_text())
    assert meta["evaluation"] == ev and meta["dim"] == 1280 + 256 and meta["encoder"] == report["encoder"]
    assert (store / tar).is_file()

    # A query encodes with the version's fine-tuned encoder (a 1280-d pretrained vector would not fit).
    q = run(["query", "fashion", str(DEMO / "fashion/crown/google.png"), "--top-k", "1"], store)
    assert q.returncode == 0, q.stderr
    assert json.loads(q.stdout)["results"][0]["name"] == "crown/google.png"


def test_evaluate_prints_json_and_writes_the_html_report(tmp_path, builtin_tag):
    data = tmp_path / "set"
    for label in sorted(p.name for p in (DEMO / "fashion").iterdir())[:12]:
        (data / label).mkdir(parents=True)
        for p in (DEMO / "fashion" / label).iterdir():
            (data / label / p.name).write_bytes(p.read_bytes())
    report = tmp_path / "report.html"
    r = run(["evaluate", "--data", str(data), "--json", "--report", str(report)], tmp_path / "s")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n"] == 36 and out["queries"] == 12
    for name in ("pretrained", "finetuned"):
        assert set(out[name]) == {"recall_at_1", "recall_at_5", "map_at_r", "recall_at_1_ci"}
        lo, hi = out[name].pop("recall_at_1_ci")
        assert all(0 <= v <= 1 for v in out[name].values()) and lo <= out[name]["recall_at_1"] <= hi
    assert len(out["gain"]["ci"]) == 2 and len(out["open_set"]["held_out_categories"]) == 4  # 30% of 12
    page = report.read_text()
    assert page.count("<svg") == 2 and "Worst queries" in page
    assert page.count('class="q"') == 12 and page.count("data:image/jpeg;base64,") >= 12 * 2
    bad = run(["evaluate", "--data", str(tmp_path / "missing.zip")], tmp_path / "s")
    assert bad.returncode == 2 and "cannot read" in bad.stderr


def test_console_script_lists_every_command():
    """`make install` puts the `simserver` console script next to the interpreter."""
    exe = Path(sys.executable).with_name("simserver")
    assert exe.is_file(), f"no {exe}: run `make install` (pip install --no-deps -e .)"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    listed = set(re.findall(r"^    (\S+)", out.stdout, re.M))  # argparse lists sub-commands indented
    assert {"encoder", "domain", "query", "evaluate", "bench", "deploy", "bento"} <= listed, listed
    bench = subprocess.run([str(exe), "bench", "--help"], capture_output=True, text=True, timeout=60)
    listed = set(re.findall(r"^    (\S+)", bench.stdout, re.M))
    assert {"encoder", "index", "http", "training", "quantization", "relevance", "quality", "all"} <= listed
