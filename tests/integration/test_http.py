"""HTTP contract against a real `bentoml serve` on 127.0.0.1 (see conftest.server)."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests
from PIL import Image

from tests.integration.conftest import DEMO, TEST_DATA

DRESS = DEMO / "fashion/dress/google.png"


def png_bytes(size=(64, 48), color=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def make_zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def assert_error(resp: requests.Response, status: int, *words: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str), body
    for w in words:
        assert w.lower() in body["error"].lower(), body


def search(server, domain: str, data: bytes, **fields) -> requests.Response:
    return requests.post(
        f"{server.url}/{domain}/search",
        files={"image": ("q.png", data)},
        data={k: str(v) for k, v in fields.items()},
        timeout=60,
    )


def train(server, domain: str, archive: bytes, timeout: float = 300) -> tuple[str, requests.Response]:
    r = requests.post(
        f"{server.url}/{domain}/train/submit", files={"archive": ("set.zip", archive)}, timeout=60
    )
    assert r.status_code == 200, r.text
    task_id = r.json()["task_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = requests.get(f"{server.url}/{domain}/train/status", params={"task_id": task_id}, timeout=10)
        assert status.status_code == 200, status.text
        if status.json()["status"] in ("completed", "failed"):
            break
        time.sleep(0.5)
    result = requests.get(f"{server.url}/{domain}/train/get", params={"task_id": task_id}, timeout=10)
    return status.json()["status"], result


# -- health, docs, listing -------------------------------------------------------------------------
def test_probes_and_docs(server):
    assert requests.get(f"{server.url}/readyz", timeout=5).status_code == 200
    assert server.probe_hangs == 0  # every probe while starting was answered (503), none hung
    assert requests.get(f"{server.url}/livez", timeout=5).status_code == 200
    spec = requests.get(f"{server.url}/docs.json", timeout=10).json()
    paths = set(spec["paths"])
    for route in ("/{domain}/search", "/{domain}/train/submit", "/similarity", "/domains", "/stats"):
        assert route in paths, sorted(paths)


def test_domains_lists_versions_counts_encoder_metric(server):
    r = requests.get(f"{server.url}/domains", timeout=10)
    assert r.status_code == 200
    by_name = {d["name"]: d for d in r.json()}
    for name, n in (("fashion", 141), ("food", 390), ("almonds-suppliers", 74)):
        d = by_name[name]
        files = [p for p in (DEMO / name).rglob("*") if p.is_file() and p.name != "metadata.csv"]
        assert len(files) == n  # the bundled demo set itself (every other file an image)
        labels: dict[str, int] = {}
        for p in files:
            labels[p.parent.name] = labels.get(p.parent.name, 0) + 1
        assert d["count"] == n and d["labels"] == dict(sorted(labels.items()))
        assert d["version"] and d["metric"] == "cosine" and d["encoder"] == "builtin"
        assert d["encoder_id"].startswith("efficientnet-lite0-imagenet:")
    assert by_name["scratch"]["version"] is None and by_name["scratch"]["count"] == 0


# -- search ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("domain", ["fashion", "food", "almonds-suppliers"])
def test_search_finds_the_indexed_image_first(server, domain):
    query = sorted(p for p in (DEMO / domain).rglob("*") if p.is_file())[4]
    r = search(server, domain, query.read_bytes())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["domain"] == domain and body["version"]
    results = body["results"]
    assert len(results) == 5  # the domain's default top_k
    top = results[0]
    assert top["name"] == query.relative_to(DEMO / domain).as_posix()
    assert top["label"] == query.relative_to(DEMO / domain).parts[0]
    assert top["score"] > 0.999 and abs(top["distance"]) < 1e-3
    scores = [h["score"] for h in results]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    # `scores` (each modality's own) is for image + text queries only.
    assert set(top) - {"scores"} == {"id", "name", "label", "score", "distance", "metadata"}
    assert top.get("scores") is None


def test_search_top_k_and_other_style_of_same_item(server):
    r = search(server, "fashion", DRESS.read_bytes(), top_k=3)
    names = [h["name"] for h in r.json()["results"]]
    assert len(names) == 3 and names[0] == "dress/google.png"
    assert "dress/twitter.png" in names  # same item, other artist


def test_stored_image_is_returned(server):
    hit = search(server, "fashion", DRESS.read_bytes(), top_k=1).json()["results"][0]
    r = requests.get(f"{server.url}/fashion/images/{hit['id']}", timeout=10)
    assert r.status_code == 200 and r.content == DRESS.read_bytes()
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-item-name"] == "dress/google.png"
    version = search(server, "fashion", DRESS.read_bytes(), top_k=1).json()["version"]
    ok = requests.get(f"{server.url}/fashion/images/{hit['id']}", params={"version": version}, timeout=10)
    assert ok.status_code == 200
    stale = requests.get(f"{server.url}/fashion/images/{hit['id']}", params={"version": "old"}, timeout=10)
    assert_error(stale, 409, "no longer served")


def test_similarity(server):
    def sim(a: bytes, b: bytes, metric="cosine"):
        return requests.post(
            f"{server.url}/similarity",
            files={"image_a": ("a", a), "image_b": ("b", b)},
            data={"metric": metric},
            timeout=60,
        )

    same = sim(DRESS.read_bytes(), DRESS.read_bytes()).json()
    assert same["score"] > 0.999 and abs(same["distance"]) < 1e-4
    near = sim(DRESS.read_bytes(), (DEMO / "fashion/dress/twitter.png").read_bytes()).json()
    far = sim(DRESS.read_bytes(), (TEST_DATA / "hammer1.webp").read_bytes()).json()
    assert near["score"] > far["score"]
    for metric in ("l1", "l2"):
        r = sim(DRESS.read_bytes(), (TEST_DATA / "hammer1.webp").read_bytes(), metric)
        assert r.status_code == 200 and r.json()["metric"] == metric and 0 < r.json()["score"] < 1


# -- bad input: always a 4xx JSON object saying what was wrong ----------------------------------------
def test_bad_search_input(server):
    valid = DRESS.read_bytes()
    assert_error(search(server, "fashion", b""), 400, "empty")
    assert_error(search(server, "fashion", b"hello, not an image"), 400, "not an image")
    assert_error(search(server, "fashion", valid[: len(valid) // 2]), 400, "image")
    assert_error(search(server, "nope", valid), 404, "unknown domain", "nope")
    for bad in (0, 101, -1, "abc"):
        assert_error(search(server, "fashion", valid, top_k=bad), 400, "top_k")
    r = requests.post(f"{server.url}/fashion/search", timeout=10)
    assert_error(r, 400, "image")
    # 2400x2400 > the scratch domain's 4,000,000-pixel limit (PNG of one colour: a few KB on the wire).
    assert_error(search(server, "scratch", png_bytes((2400, 2400))), 413, "pixels")


def test_thin_image_and_odd_requests(server):
    # 20000x100: shrunk before padding (padding first would allocate a 20000^2 canvas).
    assert search(server, "fashion", png_bytes((20000, 100))).status_code == 200
    r = requests.post(
        f"{server.url}/fashion/search",
        data=b"x" * 10,
        headers={"Content-Type": "multipart/form-data"},
        timeout=10,
    )
    assert_error(r, 400, "boundary")
    r = requests.post(
        f"{server.url}/fashion/search",
        data=b"",
        headers={"Content-Type": "multipart/form-data; boundary=x", "Content-Length": str(10**10)},
        timeout=10,
    )
    assert_error(r, 413, "limit")
    # A text value in a file field: BentoML would fetch it as a URL; here it is refused.
    for value in ("hello", "http://127.0.0.1:1/x.png"):
        r = requests.post(f"{server.url}/fashion/search", files={"image": (None, value)}, timeout=10)
        assert_error(r, 400, "uploaded as files")
    # A text value as the training archive: refused by /submit itself, before a task is stored.
    r = requests.post(f"{server.url}/scratch/train/submit", files={"archive": (None, "hello")}, timeout=10)
    assert_error(r, 400, "archive", "upload it as a file")


def test_a_request_id_reaches_the_log_lines_of_the_internal_services(server):
    # Several requests: on kept-alive connections the index service once logged an earlier
    # request's id (the first request of a connection was right, the next ones not).
    rids = [f"itest-{time.monotonic_ns()}-{i}" for i in range(4)]
    for i, rid in enumerate(rids):
        r = requests.get(
            f"{server.url}/fashion/similar",
            params={"id": f"no/such-item-{i}"},
            headers={"X-Request-ID": rid},
            timeout=30,
        )
        assert r.status_code == 404 and r.json()["request_id"] == rid and r.headers["x-request-id"] == rid
    deadline = time.monotonic() + 10
    missing = rids
    while time.monotonic() < deadline:  # the index service logs each refusal; the log is flushed shortly
        log = server.log.read_text(errors="replace").splitlines()
        missing = [
            rid
            for i, rid in enumerate(rids)
            if not any(
                f"[req {rid}]" in line and "[service:index-fashion:" in line and f"no/such-item-{i}'" in line
                for line in log
            )
        ]
        if not missing:
            return
        time.sleep(0.2)
    lines = [line for line in log if "no/such-item-" in line]
    raise AssertionError(f"no index-service log line with the ids {missing}: {lines}")


def test_unknown_domain_everywhere(server):
    assert_error(requests.get(f"{server.url}/nope/images/0", timeout=10), 404, "unknown domain")
    assert_error(requests.get(f"{server.url}/fashion/images/99999", timeout=10), 404, "no item")
    r = requests.post(f"{server.url}/nope/train/submit", files={"archive": ("a.zip", b"x")}, timeout=10)
    assert_error(r, 404, "unknown domain")


def test_bad_similarity_input(server):
    r = requests.post(
        f"{server.url}/similarity",
        files={"image_a": ("a", DRESS.read_bytes()), "image_b": ("b", b"GIF89a broken")},
        timeout=30,
    )
    assert_error(r, 400, "image_b")
    r = requests.post(
        f"{server.url}/similarity",
        files={"image_a": ("a", DRESS.read_bytes()), "image_b": ("b", DRESS.read_bytes())},
        data={"metric": "hamming"},
        timeout=30,
    )
    assert_error(r, 400, "metric")


# -- training -------------------------------------------------------------------------------------------
def _fruit_set() -> dict[str, bytes]:
    files = {}
    for label in ("food-fruit", "drink"):
        for p in sorted((DEMO / "food" / label).iterdir())[:6]:
            files[f"{label}/{p.name}"] = p.read_bytes()
    return files


def test_train_then_search_sees_new_version_labels_and_metadata(server):
    files = _fruit_set()
    first = next(iter(files))
    files["food-fruit/broken.png"] = files[first][:200]
    files["metadata.csv"] = f"filename,product_id\n{first},SKU-42\n".encode()
    status, r = train(server, "scratch", make_zip(files))
    assert status == "completed", r.text
    body = r.json()
    assert body["indexed"] == 12 and body["labels"] == {"drink": 6, "food-fruit": 6}
    assert [s["name"] for s in body["skipped"]] == ["food-fruit/broken.png"]
    assert body["skipped"][0]["reason"] and body["seconds"] > 0

    found = search(server, "scratch", files[first]).json()
    assert found["version"] == body["version"]
    assert found["results"][0]["name"] == first and found["results"][0]["metadata"] == {
        "product_id": "SKU-42"
    }
    assert len(found["results"]) == 4 and {h["label"] for h in found["results"]} <= {"drink", "food-fruit"}
    listed = {d["name"]: d for d in requests.get(f"{server.url}/domains", timeout=10).json()}
    assert listed["scratch"]["version"] == body["version"] and listed["scratch"]["count"] == 12


def _zip_with_names(names: list[str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for n in names:
            zf.writestr(zipfile.ZipInfo(n), png_bytes())
    return buf.getvalue()


@pytest.mark.parametrize(
    ("archive", "status", "words"),
    [
        (b"this is not a zip", 400, ("not a valid zip",)),
        (b"", 400, ("empty",)),
        (None, 400, ("no usable image",)),  # zip of text files
        ("../evil.png", 400, ("..",)),
        ("/etc/evil.png", 400, ("absolute",)),
        ("many", 413, ("files", "limit")),
        ("bomb", 413, ("expands",)),
        ("pixels", 413, ("pixels",)),
    ],
)
def test_bad_archives_fail_and_keep_previous_version(server, archive, status, words):
    before = search(server, "food", (DEMO / "food/drink").iterdir().__next__().read_bytes()).json()["version"]
    if archive is None:
        archive = make_zip({"a/readme.txt": b"hello", "b/notes.txt": b"world"})
    elif archive == "many":
        archive = make_zip({f"c{i % 3}/{i}.png": png_bytes() for i in range(61)})
    elif archive == "bomb":
        archive = make_zip({"a/zeros.png": b"\0" * 25_000_000})
    elif archive == "pixels":
        archive = make_zip({"a/ok.png": png_bytes(), "a/huge.png": png_bytes((3000, 3000))})
    elif isinstance(archive, str):
        archive = _zip_with_names(["good/a.png", archive])
    domain = "scratch" if archive is not None else "food"
    task_status, r = train(server, domain, archive)
    assert task_status == "failed"
    assert_error(r, status, *words)
    after = search(server, "food", (DEMO / "food/drink").iterdir().__next__().read_bytes()).json()["version"]
    assert after == before


def test_new_pointer_is_picked_up_without_restart(server, demo_store, encoder, domains_dir):
    """A version published by someone else (CLI, another replica) is served after one poll."""
    from simserver.domain_config import load_domains
    from simserver.ingest import read_folder
    from simserver.repository import Repository
    from simserver.store import LocalStore
    from simserver.training import train_domain
    from tests.integration.conftest import PretrainedBackend

    cfg = load_domains(domains_dir)["scratch"]
    ds = read_folder(DEMO / "fashion", cfg.limits.model_copy(update={"max_entries": 1000}))
    report = train_domain(
        Repository(LocalStore(demo_store)), cfg, ds, PretrainedBackend(encoder), mode="pretrained"
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        body = search(server, "scratch", DRESS.read_bytes()).json()
        if body.get("version") == report.version:
            break
        time.sleep(0.5)
    assert body["version"] == report.version and body["results"][0]["name"] == "dress/google.png"


# -- robustness (BentoML 1.4 pitfalls) ---------------------------------------------------------------------
def _batching(server) -> dict:
    r = requests.get(f"{server.url}/stats", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["batching"]["builtin"]


def test_concurrent_searches_have_no_errors_and_are_batched(server):
    """Crosses BentoML's default 100-request client recycle, which dropped in-flight calls; the
    encoder runs concurrent searches' images together (GET /stats counts calls per run)."""
    queries = [p.read_bytes() for p in sorted((DEMO / "fashion").rglob("*.png"))[:16]]
    codes: list[int] = []
    before = _batching(server)

    def one(i: int) -> int:
        return search(server, "fashion", queries[i % len(queries)]).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(240)))
    assert codes.count(200) == 240, {c: codes.count(c) for c in set(codes)}
    after = _batching(server)
    calls, runs = after["calls"] - before["calls"], after["runs"] - before["runs"]
    assert calls == 240 and after["rows"] - before["rows"] == 240
    assert runs < calls, after
    assert sum(int(k) * v for k, v in after["calls_per_run"].items()) == after["calls"]


def assert_sigterm_with_requests_in_flight_stops_every_process(srv) -> None:
    """The server and each of its services exit on SIGTERM while clients keep it busy."""
    stop = threading.Event()
    data = DRESS.read_bytes()
    ok = []

    def hammer() -> None:
        while not stop.is_set():
            try:
                ok.append(search(srv, "fashion", data).status_code == 200)
            except requests.RequestException:
                pass

    threads = [threading.Thread(target=hammer, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(2)
    processes = srv.processes()
    assert len(processes) >= 6, processes  # arbiter, gateway, encoder, trainer, index services
    took = srv.stop(timeout=60)
    stop.set()
    assert any(ok), "no search succeeded before SIGTERM"
    assert took is not None, "server ignored SIGTERM with requests in flight"
    assert not [p for p in processes if p.is_running() and p.status() != "zombie"], (
        "a service outlived SIGTERM"
    )


def test_a_killed_server_leaves_no_worker_restarts_on_its_port_and_stops_on_sigterm(
    tmp_path, demo_store, domains_dir, builtin_tag
):
    """kill -9 of `bentoml serve` during a training used to leave every worker running (each in a
    process group of its own), holding the port: a restart failed with "Address already in use";
    and the job stayed `in_progress` for ever, with its temp files left in the store. The restarted
    server then stops on SIGTERM with requests in flight (its own server: stopping the session's
    would end the tests after it; one server start for both, each start is 30-80 s)."""
    import json
    import shutil

    from tests.integration.conftest import Server, server_env

    store = tmp_path / "store"
    shutil.copytree(demo_store, store)  # the training below must not reach the session's store
    hour_ago = time.time() - 3600
    leftovers = [store / "domains/food/versions/20000101T000000-dead00/.encoder.tar.x1y2.tmp"]
    leftovers.append(store / "domains/food/.CURRENT.a1b2.tmp")
    for p in leftovers:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
        os.utime(p, (hour_ago - 24 * 3600, hour_ago - 24 * 3600))  # an aborted version waits a day
    srv = Server(server_env(store, domains_dir, tmp_path), tmp_path / "server.log")
    srv.wait_ready()
    workers = srv.processes()[1:]
    assert len(workers) >= 5, workers  # gateway, encoder, trainer, index services
    photos = sorted(p for p in (DEMO / "food").rglob("*") if p.is_file())[::7][:55]
    archive = make_zip({f"{p.parent.name}/{p.name}": p.read_bytes() for p in photos})
    r = requests.post(
        f"{srv.url}/scratch/train/submit",
        files={"archive": ("set.zip", archive)},
        data={"mode": "finetune"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    task_id = r.json()["task_id"]
    record = store / "jobs" / f"{task_id}.json"
    deadline = time.monotonic() + 30
    while not record.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    assert json.loads(record.read_text())["status"] == "in_progress"  # killed mid-training
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=15)
    for p in alive:
        p.kill()
    assert not alive, f"{len(alive)} workers outlived a killed server"
    srv.restart()  # the same port, at once
    try:
        assert search(srv, "fashion", DRESS.read_bytes()).status_code == 200
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = requests.get(f"{srv.url}/scratch/train/status", params={"task_id": task_id}, timeout=10)
            if status.json()["status"] != "in_progress":
                break
            time.sleep(0.5)
        assert status.status_code == 200 and status.json()["status"] == "failed", status.text
        got = requests.get(f"{srv.url}/scratch/train/get", params={"task_id": task_id}, timeout=10)
        assert_error(got, 503, "interrupted by a restart")
        assert not any(p.exists() for p in leftovers)
        assert not leftovers[0].parent.exists()  # the version folder without meta.json
        assert_sigterm_with_requests_in_flight_stops_every_process(srv)
    finally:
        srv.stop()
