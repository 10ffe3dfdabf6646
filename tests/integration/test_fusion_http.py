"""Through the session's real server: a training on titles + shops + product ids learns fusion
weights and a match threshold, stores them with the version, and /match and /match/groups apply
them unless the request sends its own; matching one group against another as a task."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time

import pytest
import requests

from simserver.bench.match_set import FOOD, metadata_rows
from tests.integration.conftest import ROOT
from tests.integration.test_http import assert_error, make_zip, train

PRODUCTS = 14  # x 3 shops: 42 images, a pretrained training in a few seconds


def shops_zip() -> tuple[bytes, list[dict[str, str]]]:
    rows = metadata_rows()
    keep = sorted({r["product"] for r in rows})[::9][:PRODUCTS]
    rows = [r for r in rows if r["product"] in keep]
    buf = io.StringIO()
    w = csv.DictWriter(buf, ["filename", "title", "shop", "product"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    files = {r["filename"]: (FOOD / r["filename"]).read_bytes() for r in rows}
    return make_zip({**files, "metadata.csv": buf.getvalue().encode()}), rows


@pytest.fixture(scope="module")
def trained(server):
    archive, rows = shops_zip()
    status, result = train(server, "shops", archive)
    assert status == "completed", result.text
    return result.json(), rows


def weighted(scores: dict[str, float], weights: dict[str, float]) -> float:
    total = sum(weights[m] for m in scores)
    return sum(weights[m] * s for m, s in scores.items()) / total


def test_training_learns_weights_and_match_applies_them(server, trained):
    reply, rows = trained
    fusion = reply["evaluation"]["fusion"]
    assert fusion["learned"] is True, fusion
    assert fusion["products"]["fit"] + fusion["products"]["holdout"] == PRODUCTS
    held = fusion["holdout"]
    assert held["queries"] == fusion["products"]["holdout"] * 3 * 2
    assert {"image_only", "text_only", "fused", "fused_domain_weights"} <= set(held)
    # The yaml says image only; titles tell these look-alike drawings apart, so text gets weight.
    learned = fusion["weights"]
    assert learned != {"image": 1.0, "text": 0.0} and learned["text"] > 0
    # Stored with the version (immutable manifest), as the listing shows.
    versions = requests.get(f"{server.url}/shops/versions", timeout=10).json()
    assert versions[0]["version"] == reply["version"]
    assert versions[0]["evaluation"]["fusion"]["weights"] == learned

    item = next(r["filename"] for r in rows if r["shop"] == "google")
    got = requests.post(f"{server.url}/shops/match", data={"id": item}, timeout=30)
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["weights_from"] == "version" and body["weights"] == learned
    assert body["threshold"] == fusion["match_threshold"]
    assert {m["group"] for m in body["matches"]} == {"twitter", "fluent"}
    for m in body["matches"]:
        assert m["match_score"] == pytest.approx(weighted(m["hit"]["scores"], learned), abs=1e-5)
        assert m["same_product"] is (m["match_score"] >= body["threshold"])
    # The request's own weights win; the yaml's are what the version would serve without learning.
    own = requests.post(
        f"{server.url}/shops/match",
        data={"id": item, "weights": json.dumps({"image": 1, "text": 0})},
        timeout=30,
    ).json()
    assert own["weights_from"] == "request" and own["weights"] == {"image": 1.0, "text": 0.0}
    for m in own["matches"]:
        assert m["match_score"] == pytest.approx(m["hit"]["scores"]["image"], abs=1e-5)
    pairs = requests.post(
        f"{server.url}/shops/match/groups", json={"group": "google", "against": "twitter"}, timeout=60
    ).json()
    assert pairs["weights_from"] == "version" and pairs["weights"] == learned
    assert len(pairs["pairs"]) == PRODUCTS


def test_a_version_that_learned_nothing_serves_the_yaml_weights(server):
    body = requests.post(f"{server.url}/food/match", data={"id": "drink/baby_bottle-google.png"}, timeout=30)
    assert body.status_code == 200, body.text
    # The session's food version was built by an encode-only backend: nothing learned.
    assert body.json()["weights_from"] == "domain" and body.json()["weights"] == {"image": 0.5, "text": 0.5}


def wait(server, domain: str, task_id: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = requests.get(
            f"{server.url}/{domain}/match/groups/status", params={"task_id": task_id}, timeout=10
        )
        assert r.status_code == 200, r.text
        if r.json()["status"] in ("completed", "failed"):
            return r.json()["status"]
        time.sleep(0.3)
    raise AssertionError("match/groups task still running")


def test_match_groups_task_answers_what_the_direct_call_does(server, trained):
    from simserver.client import Client

    shops = Client(server.url).domain("shops")
    direct = shops.match_groups("google", "fluent")
    task_id = shops.submit_match_groups("google", "fluent")
    assert wait(server, "shops", task_id) == "completed"
    r = requests.get(f"{server.url}/shops/match/groups/get", params={"task_id": task_id}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json() == direct.model_dump(mode="json") and len(direct.pairs) == PRODUCTS
    assert shops.match_groups("google", "fluent", threshold=0.9, task=True).threshold == 0.9
    cli = [sys.executable, "-m", "simserver.cli"]
    out = subprocess.run(
        [*cli, "match-groups", "shops", "twitter", "google", "--task", "--url", server.url],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    via_cli = json.loads(out.stdout)
    assert via_cli["group"] == "twitter" and len(via_cli["pairs"]) == PRODUCTS
    for name, field in (("status", "status"), ("result", "pairs")):
        out = subprocess.run(
            [*cli, f"match-groups-{name}", "shops", task_id, "--url", server.url],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert field in json.loads(out.stdout)


def test_match_groups_task_refusals(server, trained):
    submit = f"{server.url}/shops/match/groups/submit"
    r = requests.post(
        f"{server.url}/fashion/match/groups/submit", json={"group": "a", "against": "b"}, timeout=30
    )
    assert_error(r, 400, "no text configured")
    assert_error(requests.post(submit, json={"group": "google"}, timeout=30), 400, "against")
    assert_error(requests.post(submit, json=["google", "twitter"], timeout=30), 400, "json object")
    assert_error(requests.post(submit, data=b"{not json", timeout=30), 400, "json object")
    body = {"group": "google", "against": "twitter"}
    assert_error(requests.post(submit, json={**body, "threshold": {}}, timeout=30), 400, "threshold")
    assert_error(requests.post(submit, json={**body, "threshold": 1.5}, timeout=30), 400, "threshold")
    assert_error(requests.post(submit, json={**body, "fusion": "max"}, timeout=30), 400, "fusion")
    r = requests.post(
        f"{server.url}/nope/match/groups/submit", json={"group": "a", "against": "b"}, timeout=30
    )
    assert_error(r, 404, "unknown domain")
    # An unknown group is the task's to find (the catalog is not in the gateway): failed, with its 400.
    task_id = requests.post(submit, json={"group": "google", "against": "nope"}, timeout=30).json()["task_id"]
    assert wait(server, "food", task_id) == "failed"
    r = requests.get(f"{server.url}/food/match/groups/get", params={"task_id": task_id}, timeout=30)
    assert_error(r, 400, "against", "nope")
    for route in ("status", "get"):
        r = requests.get(
            f"{server.url}/food/match/groups/{route}", params={"task_id": "no-such-task"}, timeout=10
        )
        assert_error(r, 404)
    r = requests.put(f"{server.url}/food/match/groups/cancel", params={"task_id": task_id}, timeout=10)
    assert_error(r, 405, "cannot be cancelled")
