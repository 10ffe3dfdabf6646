"""Duplicate detection through the shared real server (read-only: the demo ``fashion`` domain):
check an exact and a mirrored copy, an unrelated photo, the whole-catalog groups task, the
calibration in ``/domains``, and every refusal. The on-insert and on-demand-calibration paths
change a catalog: they run on the catalog tests' own server (tests/integration/test_catalog_http.py)."""

from __future__ import annotations

import io
import time

import requests
from PIL import Image, ImageOps

from simserver.copies import TRANSFORMS
from simserver.duplicates import SIGNALS
from tests.integration.conftest import DEMO, TEST_DATA
from tests.integration.test_http import assert_error, make_zip

DRESS = (DEMO / "fashion" / "dress" / "google.png").read_bytes()


def check(server, domain: str = "fashion", **files) -> requests.Response:
    parts = []
    for field, value in files.items():
        for name, data in value if isinstance(value, list) else [value]:
            parts.append((field, (name, data)))
    return requests.post(f"{server.url}/{domain}/duplicates/check", files=parts, timeout=120)


def mirrored(data: bytes) -> bytes:
    buf = io.BytesIO()
    ImageOps.mirror(Image.open(io.BytesIO(data))).save(buf, "PNG")  # alpha kept, as a re-lister would
    return buf.getvalue()


def test_check_tells_copies_from_an_unrelated_photo(server):
    r = check(
        server,
        images=[
            ("same.png", DRESS),
            ("mirror.png", mirrored(DRESS)),
            ("hammer.webp", (TEST_DATA / "hammer1.webp").read_bytes()),
        ],
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["domain"] == "fashion" and body["calibrated"] is True
    same, mirror, hammer = body["results"]
    assert [same["name"], mirror["name"], hammer["name"]] == ["same.png", "mirror.png", "hammer.webp"]
    assert same["duplicate"] is True
    top = same["matches"][0]
    assert top["id"] == "dress/google.png" and top["score"] > 0.99 and top["same_item"] >= body["threshold"]
    assert top["inliers"] >= 20 and top["ncc"] > 0.95 and top["edge_ncc"] > 0.95  # the same image
    assert top["detail_ncc"] > 0.95
    assert mirror["duplicate"] is True and mirror["matches"][0]["id"] == "dress/google.png"
    assert mirror["matches"][0]["detail_ncc"] > 0.9  # aligned on the mirror image
    assert hammer["duplicate"] is False
    assert all(m["same_item"] < body["threshold"] for m in hammer["matches"])
    # matches come most likely copy first
    probs = [m["same_item"] for m in same["matches"]]
    assert probs == sorted(probs, reverse=True)
    # the same through an archive
    r = check(server, archive=("set.zip", make_zip({"a/same.png": DRESS})))
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["duplicate"] is True


def test_check_refusals(server):
    assert_error(requests.post(f"{server.url}/fashion/duplicates/check", timeout=30), 400)
    assert_error(check(server, image=("x.png", b"not an image")), 400)
    assert_error(check(server, "nope", image=("a.png", DRESS)), 404, "unknown domain")
    assert_error(check(server, "scratch", image=("a.png", DRESS)), 409, "train it first")
    assert_error(check(server, archive=("a.zip", b"PK not a zip")), 400)


def test_groups_task_and_calibration_in_domains(server):
    r = requests.post(f"{server.url}/fashion/duplicates/submit", timeout=30)
    assert r.status_code == 200, r.text
    task = r.json()["task_id"]
    for _ in range(600):
        status = requests.get(f"{server.url}/fashion/duplicates/status", params={"task_id": task}, timeout=10)
        assert status.status_code == 200, status.text
        if status.json()["status"] != "in_progress":
            break
        time.sleep(0.3)
    got = requests.get(f"{server.url}/fashion/duplicates/get", params={"task_id": task}, timeout=10)
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["items"] == 141 and body["domain"] == "fashion"
    ids = {
        i["id"]
        for i in requests.get(f"{server.url}/fashion/items", params={"limit": 1000}, timeout=10).json()[
            "items"
        ]
    }
    members = [m for g in body["groups"] for m in [g["keep"], *g["duplicates"]]]
    assert set(members) <= ids and len(members) == len(set(members))  # a partition of some items
    assert body["to_remove"] == sorted(d for g in body["groups"] for d in g["duplicates"])
    assert body["verified_pairs"] <= body["candidate_pairs"]
    assert_error(
        requests.get(f"{server.url}/fashion/duplicates/get", params={"task_id": "nope"}, timeout=10), 404
    )
    assert_error(requests.post(f"{server.url}/nope/duplicates/submit", timeout=10), 404, "unknown domain")
    assert_error(requests.post(f"{server.url}/scratch/duplicates/calibrate", timeout=10), 409)
    fashion = next(
        d for d in requests.get(f"{server.url}/domains", timeout=10).json() if d["name"] == "fashion"
    )
    cal = fashion["duplicates"]
    assert set(cal["recall"]) == set(TRANSFORMS)
    assert 0 <= cal["lookalike_fpr"] <= 1 and cal["copies"] == cal["images"] * len(TRANSFORMS)
    assert cal["decision"]["threshold"] > 0
    assert len(cal["decision"]["weights"]) == 1 + len(SIGNALS)  # fitted on every signal, detail too
