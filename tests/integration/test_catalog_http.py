"""The living catalog through a real server: add -> found, replace -> the new image, delete -> never
returned again, filters, "more like this", versions and activation, the CLI's items commands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import requests

from tests.integration.conftest import DEMO, ROOT, TEST_DATA, PretrainedBackend, Server, server_env
from tests.integration.test_http import assert_error, make_zip, search

SHOP = """\
name: shop
description: "catalog test domain"
top_k: 5
limits: {max_entries: 200}
"""


@pytest.fixture(scope="module")
def shop(tmp_path_factory, encoder, builtin_tag):
    """A server whose one domain, ``shop``, starts as the demo fashion set (pretrained, 141 items),
    with an API key set (changes need it; reads do not)."""
    from simserver.domain_config import load_domains
    from simserver.ingest import read_folder
    from simserver.repository import Repository
    from simserver.store import LocalStore
    from simserver.training import train_domain

    tmp = tmp_path_factory.mktemp("catalog-server")
    domains = tmp / "domains"
    domains.mkdir()
    (domains / "shop.yaml").write_text(SHOP)
    cfg = load_domains(domains)["shop"]
    train_domain(
        Repository(LocalStore(tmp / "store")),
        cfg,
        read_folder(DEMO / "fashion", cfg.limits),
        PretrainedBackend(encoder),
        mode="pretrained",
    )
    env = server_env(tmp / "store", domains, tmp)
    env["API_KEY"] = "secret"
    srv = Server(env, tmp / "server.log")
    srv.wait_ready()
    yield srv
    srv.stop()


KEY = {"Authorization": "Bearer secret"}


def add(
    server, files: list[tuple[str, bytes]], label: str, ids: list[str] | None = None
) -> requests.Response:
    parts = [("images", (name, data)) for name, data in files]
    data: list[tuple[str, str]] = [("label", label)] + [("ids", i) for i in ids or []]
    return requests.post(f"{server.url}/shop/items", files=parts, data=data, headers=KEY, timeout=120)


def top(server, data: bytes, **fields) -> dict:
    r = search(server, "shop", data, **fields)
    assert r.status_code == 200, r.text
    return r.json()


def test_add_replace_delete(shop):
    hammer = (TEST_DATA / "hammer1.webp").read_bytes()
    scissors = (TEST_DATA / "scissors1.webp").read_bytes()
    r = requests.post(
        f"{shop.url}/shop/items", files={"images": ("h.webp", hammer)}, data={"label": "tools"}, timeout=60
    )
    assert_error(r, 401, "api key")
    r = add(shop, [("h.webp", hammer)], "tools", ["sku/hammer 1"])
    assert r.status_code == 200, r.text
    reply = r.json()
    assert (reply["added"], reply["replaced"], reply["count"], reply["skipped"]) == (1, 0, 142, [])
    # add -> found, at once (the index service serves what it committed), under its stable id
    hit = top(shop, hammer)["results"][0]
    assert (hit["id"], hit["label"], hit["distance"]) == ("sku/hammer 1", "tools", pytest.approx(0, abs=1e-3))
    item = requests.get(f"{shop.url}/shop/items/sku/hammer 1", timeout=10).json()
    assert item["name"] == "tools/h.webp" and item["created_at"]
    assert requests.get(f"{shop.url}/shop/images/sku/hammer 1", timeout=10).content == hammer
    # replace -> the new image is what that id finds and returns
    r = add(shop, [("s.webp", scissors)], "tools", ["sku/hammer 1"])
    assert r.json()["replaced"] == 1 and r.json()["added"] == 0 and r.json()["count"] == 142
    assert top(shop, scissors)["results"][0]["id"] == "sku/hammer 1"
    assert requests.get(f"{shop.url}/shop/images/sku/hammer 1", timeout=10).content == scissors
    # delete -> never returned again
    assert_error(requests.delete(f"{shop.url}/shop/items/sku/hammer 1", timeout=10), 401)
    r = requests.delete(f"{shop.url}/shop/items/sku/hammer 1", headers=KEY, timeout=10)
    assert r.status_code == 200 and r.json()["deleted"] == 1 and r.json()["count"] == 141
    assert "sku/hammer 1" not in {h["id"] for h in top(shop, scissors, top_k=100)["results"]}
    assert_error(
        requests.delete(f"{shop.url}/shop/items/sku/hammer 1", headers=KEY, timeout=10), 404, "no item"
    )
    assert_error(requests.get(f"{shop.url}/shop/items/sku/hammer 1", timeout=10), 404)


def test_filters_and_similar(shop):
    dress = (DEMO / "fashion/dress/google.png").read_bytes()
    got = top(shop, dress, top_k=10, filter=json.dumps({"label": {"in": ["boot", "hat"]}}))
    assert got["results"] and {h["label"] for h in got["results"]} <= {"boot", "hat"}
    one = top(shop, dress, top_k=10, filter=json.dumps({"id": "boot/google.png"}))
    assert [h["id"] for h in one["results"]] == ["boot/google.png"]
    assert top(shop, dress, filter=json.dumps({"metadata.brand": "nobody"}))["results"] == []
    assert_error(search(shop, "shop", dress, filter="{oops"), 400, "filter", "json")
    assert_error(search(shop, "shop", dress, filter='{"price": 3}'), 400, "unknown field")
    sim = requests.get(f"{shop.url}/shop/similar", params={"id": "dress/google.png", "top_k": 5}, timeout=10)
    assert sim.status_code == 200, sim.text
    ids = [h["id"] for h in sim.json()["results"]]
    assert len(ids) == 5 and "dress/google.png" not in ids
    assert sim.json()["results"][0]["label"] == "dress"  # the same dress in another art style
    only = requests.get(
        f"{shop.url}/shop/similar",
        params={"id": "dress/google.png", "filter": json.dumps({"label": "boot"})},
        timeout=10,
    ).json()
    assert {h["label"] for h in only["results"]} == {"boot"}
    assert_error(requests.get(f"{shop.url}/shop/similar", params={"id": "nope"}, timeout=10), 404, "no item")


def test_list_delete_by_filter_versions_and_activate(shop):
    page = requests.get(f"{shop.url}/shop/items", params={"label": "dress", "limit": 2}, timeout=10).json()
    assert page["total"] >= 3 and len(page["items"]) == 2 and page["items"][0]["label"] == "dress"
    versions = requests.get(f"{shop.url}/shop/versions", timeout=10).json()
    trained = next(v for v in versions if v["kind"] == "train")
    r = requests.post(
        f"{shop.url}/shop/items/delete", json={"filter": {"label": "dress"}}, headers=KEY, timeout=30
    )
    assert r.status_code == 200 and r.json()["deleted"] == page["total"]
    dress = (DEMO / "fashion/dress/google.png").read_bytes()
    assert "dress" not in {h["label"] for h in top(shop, dress, top_k=20)["results"]}
    versions = requests.get(f"{shop.url}/shop/versions", timeout=10).json()
    assert versions[0]["kind"] in ("delete", "compact") and versions[0]["active"] and not trained["active"]
    # activate the trained version: its items serve again (the deleted dresses are back)
    assert_error(requests.post(f"{shop.url}/shop/versions/{trained['version']}/activate", timeout=10), 401)
    r = requests.post(f"{shop.url}/shop/versions/{trained['version']}/activate", headers=KEY, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["kind"] == "activate" and r.json()["activated_from"] == trained["version"]
    assert r.json()["count"] == 141
    assert top(shop, dress)["results"][0]["id"] == "dress/google.png"
    assert requests.get(f"{shop.url}/shop/versions", timeout=10).json()[0]["active"]
    assert_error(
        requests.post(f"{shop.url}/shop/versions/nope/activate", headers=KEY, timeout=10), 404, "no version"
    )


def test_similarity_with_the_domains_model(shop):
    a = (DEMO / "fashion/dress/google.png").read_bytes()
    b = (DEMO / "fashion/dress/twitter.png").read_bytes()
    c = (DEMO / "fashion/boot/google.png").read_bytes()
    pair = lambda x, y: requests.post(  # noqa: E731
        f"{shop.url}/similarity",
        files={"image_a": ("a.png", x), "image_b": ("b.png", y)},
        data={"domain": "shop"},
        timeout=60,
    )
    same, other = pair(a, b).json(), pair(a, c).json()
    assert same["domain"] == "shop" and same["metric"] == "cosine" and same["threshold"] is not None
    assert same["distance"] < other["distance"] and isinstance(same["same_label"], bool)
    assert same["same_label"] == (same["distance"] <= same["threshold"])
    unknown = requests.post(
        f"{shop.url}/similarity",
        files={"image_a": ("a.png", a), "image_b": ("b.png", b)},
        data={"domain": "nope"},
        timeout=30,
    )
    assert_error(unknown, 404, "unknown domain")
    evaluation = requests.get(f"{shop.url}/domains", timeout=10).json()[0]["evaluation"]
    assert 0.5 < evaluation["pair"]["roc_auc"] <= 1 and evaluation["pair"]["accuracy"] > 0


def test_cli_items_commands(shop, tmp_path):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "simserver.cli", *args, "--url", shop.url, "--api-key", "secret"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )

    files = [TEST_DATA / "hammer1.webp", TEST_DATA / "hammer2.webp"]
    out = cli("items", "add", "shop", *map(str, files), "--label", "tools", "--batch", "1")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["added"] == 2 and "2/2" in out.stderr  # the progress bar
    listed = json.loads(cli("items", "list", "shop", "--label", "tools").stdout)
    assert {i["id"] for i in listed["items"]} == {"tools/hammer1.webp", "tools/hammer2.webp"}
    out = cli("items", "delete", "shop", "tools/hammer1.webp")
    assert out.returncode == 0 and json.loads(out.stdout)["deleted"] == 1
    archive = tmp_path / "items.zip"
    archive.write_bytes(
        make_zip(
            {"tools/x.webp": files[0].read_bytes(), "metadata.csv": b"filename,id,brand\nx.webp,SKU-9,acme\n"}
        )
    )
    out = cli("items", "add", "shop", "--archive", str(archive))
    assert out.returncode == 0, out.stderr
    item = requests.get(f"{shop.url}/shop/items/SKU-9", timeout=10).json()
    assert item["metadata"] == {"brand": "acme"} and item["label"] == "tools"


def test_training_with_catalog_merge(shop):
    import time

    before = requests.get(f"{shop.url}/shop/items", params={"limit": 1}, timeout=10).json()["total"]
    archive = make_zip(
        {
            "tools/h1.webp": (TEST_DATA / "hammer1.webp").read_bytes(),
            "tools/h2.webp": (TEST_DATA / "hammer2.webp").read_bytes(),
        }
    )
    r = requests.post(
        f"{shop.url}/shop/train/submit",
        files={"archive": ("set.zip", archive)},
        data={"mode": "pretrained", "catalog": "merge"},
        headers=KEY,
        timeout=60,
    )
    assert r.status_code == 200, r.text
    task = r.json()["task_id"]
    for _ in range(600):
        status = requests.get(f"{shop.url}/shop/train/status", params={"task_id": task}, timeout=10).json()
        if status["status"] != "in_progress":
            break
        time.sleep(0.5)
    result = requests.get(f"{shop.url}/shop/train/get", params={"task_id": task}, timeout=10)
    assert result.status_code == 200, result.text
    assert result.json()["indexed"] == before + 2  # the archive upserted into the catalog, not replacing it
    page = requests.get(f"{shop.url}/shop/items", params={"label": "tools", "limit": 100}, timeout=10).json()
    assert {"tools/h1.webp", "tools/h2.webp"} <= {i["id"] for i in page["items"]}
    assert requests.get(f"{shop.url}/shop/versions", timeout=10).json()[0]["kind"] == "train"


def test_on_duplicate_and_calibration_on_demand(shop):
    """Runs last on ``shop``: an exact copy of an item under a new id, refused, skipped, then
    added and found by the groups task; an on-demand calibration as a new version."""
    import time

    dress = (DEMO / "fashion" / "dress" / "google.png").read_bytes()
    before = requests.get(f"{shop.url}/shop/items", params={"limit": 1}, timeout=10).json()["total"]

    def upload(on_duplicate: str | None) -> requests.Response:
        data = [("label", "dress"), ("ids", "sku-copy")]
        if on_duplicate is not None:
            data.append(("on_duplicate", on_duplicate))
        return requests.post(
            f"{shop.url}/shop/items",
            files=[("images", ("copy.png", dress))],
            data=data,
            headers=KEY,
            timeout=120,
        )

    assert_error(upload("reject"), 409, "sku-copy ~ dress/google.png", "on_duplicate=reject")
    assert_error(upload("maybe"), 400, "on_duplicate")
    r = upload("skip")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["added"] == 0 and body["count"] == before
    assert [(d["id"], d["match"]["id"], d["action"]) for d in body["duplicates"]] == [
        ("sku-copy", "dress/google.png", "skipped")
    ]
    r = upload(None)  # allow: added, and listed
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["added"] == 1 and body["duplicates"][0]["action"] == "added"
    task = requests.post(f"{shop.url}/shop/duplicates/submit", timeout=30).json()["task_id"]
    for _ in range(600):
        if (
            requests.get(f"{shop.url}/shop/duplicates/status", params={"task_id": task}, timeout=10).json()[
                "status"
            ]
            != "in_progress"
        ):
            break
        time.sleep(0.3)
    groups = requests.get(f"{shop.url}/shop/duplicates/get", params={"task_id": task}, timeout=10).json()
    group = next(g for g in groups["groups"] if "sku-copy" in [g["keep"], *g["duplicates"]])
    assert group["keep"] == "dress/google.png" and "sku-copy" in group["duplicates"]  # the older item kept
    assert "sku-copy" in groups["to_remove"]
    # on demand: a new version of kind calibrate, the same items, its calibration in /domains
    assert_error(requests.post(f"{shop.url}/shop/duplicates/calibrate", timeout=60), 401)
    r = requests.post(f"{shop.url}/shop/duplicates/calibrate", headers=KEY, timeout=300)
    assert r.status_code == 200, r.text
    cal = r.json()
    assert cal["decision"] is not None and cal["copies"] > 0
    versions = requests.get(f"{shop.url}/shop/versions", timeout=10).json()
    assert versions[0]["kind"] == "calibrate" and versions[0]["count"] == before + 1
    info = requests.get(f"{shop.url}/domains", timeout=10).json()[0]
    assert info["duplicates"]["seconds"] == cal["seconds"]
    # the same rows, encoder and settings: its calibration again, no new version
    again = requests.post(f"{shop.url}/shop/duplicates/calibrate", headers=KEY, timeout=60)
    assert again.status_code == 200, again.text
    assert again.json() == cal
    latest = requests.get(f"{shop.url}/shop/versions", timeout=10).json()[0]
    assert latest["version"] == versions[0]["version"]
    requests.delete(f"{shop.url}/shop/items/sku-copy", headers=KEY, timeout=30).raise_for_status()
