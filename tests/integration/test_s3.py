"""S3 artifact store against moto's standalone server; two real servers sharing one bucket."""

from __future__ import annotations

import os
import time

import pytest
import requests

from tests.integration.conftest import DEMO, MotoServer, Server, server_env
from tests.integration.test_http import make_zip, search

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    srv = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    url = srv.url
    saved = {k: os.environ.get(k) for k in [*AWS_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(AWS_ENV, AWS_ENDPOINT_URL=url)
    import boto3

    boto3.client("s3").create_bucket(Bucket="sim-test")
    yield srv.proc
    srv.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_s3_store_contract(moto):
    from simserver.store import S3Store, open_store

    store = open_store("s3://sim-test/unit")
    assert isinstance(store, S3Store) and store.uri == "s3://sim-test/unit"
    with pytest.raises(KeyError):
        store.get("nothing/here")
    assert not store.exists("a/b.txt")
    store.put("a/b.txt", b"one")
    store.put("a/b.txt", b"two")
    store.put("a/c/d.txt", b"three")
    assert store.get("a/b.txt") == b"two" and store.exists("a/b.txt")
    assert store.list("a") == ["a/b.txt", "a/c/d.txt"]
    with pytest.raises(ValueError):
        store.get("../escape")


def test_cached_store_serves_immutable_objects_locally(moto, tmp_path):
    from simserver.store import open_store

    store = open_store("s3://sim-test/cache", tmp_path)
    store.put("domains/d/versions/v1/meta.json", b"{}")
    store.put("domains/d/CURRENT", b"p1")
    cached = list(tmp_path.rglob("meta.json"))
    assert len(cached) == 1 and cached[0].read_bytes() == b"{}"
    assert not list(tmp_path.rglob("CURRENT"))  # pointers are never cached


@pytest.fixture(scope="module")
def pair(moto, tmp_path_factory, domains_dir, builtin_tag):
    """Server A requires API keys for training; server B does not. Same bucket, own caches."""
    servers = []
    for name, extra in (("a", {"API_KEY": "key-a, key-b"}), ("b", {})):
        tmp = tmp_path_factory.mktemp(f"replica-{name}")
        env = server_env(tmp / "unused", domains_dir, tmp)
        env.update(
            AWS_ENV,
            AWS_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"],
            STORE_URI="s3://sim-test/store",
            STORE_CACHE_DIR=str(tmp / "cache"),
            **extra,
        )
        servers.append(Server(env, tmp / "server.log"))
    for s in servers:
        s.wait_ready()
    yield servers
    for s in servers:
        s.stop()


def _submit(server, archive: bytes, key: str | None) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(
        f"{server.url}/scratch/train/submit",
        files={"archive": ("s.zip", archive)},
        headers=headers,
        timeout=60,
    )


def _wait(server, task_id: str) -> dict:
    for _ in range(600):
        st = requests.get(
            f"{server.url}/scratch/train/status", params={"task_id": task_id}, timeout=10
        ).json()
        if st["status"] != "in_progress":
            return st
        time.sleep(0.5)
    raise TimeoutError(task_id)


def _set() -> bytes:
    return make_zip(
        {
            f"{label}/{p.name}": p.read_bytes()
            for label in ("boot", "dress")
            for p in (DEMO / "fashion" / label).iterdir()
        }
    )


def test_api_keys_guard_training_only(pair):
    a, _ = pair
    assert_json = lambda r, code, word: r.status_code == code and word in r.json()["error"].lower()  # noqa: E731
    r = _submit(a, _set(), None)
    assert assert_json(r, 401, "missing api key") and r.headers["www-authenticate"] == "Bearer"
    assert assert_json(_submit(a, _set(), "nope"), 403, "not accepted")
    # Reads stay open (SEARCH_REQUIRES_KEY unset): /domains and search answer without a key.
    assert requests.get(f"{a.url}/domains", timeout=10).status_code == 200
    assert (
        search(a, "scratch", (DEMO / "fashion/boot/google.png").read_bytes()).status_code == 409
    )  # untrained
    assert requests.get(f"{a.url}/readyz", timeout=5).status_code == 200


def test_train_on_one_replica_other_serves_and_answers_status(pair):
    a, b = pair
    r = _submit(a, _set(), "key-b")
    assert r.status_code == 200, r.text
    task_id = r.json()["task_id"]
    assert _wait(a, task_id)["status"] == "completed"
    on_a = requests.get(f"{a.url}/scratch/train/get", params={"task_id": task_id}, timeout=10).json()
    # B never saw this task in its own task store: the job record in S3 answers.
    st_b = requests.get(f"{b.url}/scratch/train/status", params={"task_id": task_id}, timeout=10)
    assert st_b.status_code == 200 and st_b.json()["status"] == "completed"
    on_b = requests.get(f"{b.url}/scratch/train/get", params={"task_id": task_id}, timeout=10)
    assert on_b.status_code == 200 and on_b.json() == on_a and on_a["indexed"] == 6
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = search(b, "scratch", (DEMO / "fashion/dress/twitter.png").read_bytes())
        if found.status_code == 200 and found.json()["version"] == on_a["version"]:
            break
        time.sleep(0.5)
    assert found.json()["version"] == on_a["version"]
    assert found.json()["results"][0]["name"] == "dress/twitter.png"
    img = requests.get(f"{b.url}/scratch/images/{found.json()['results'][0]['id']}", timeout=10)
    assert img.content == (DEMO / "fashion/dress/twitter.png").read_bytes()

    # A failure is recorded too: B reports it, and both keep serving the previous version.
    bad = _submit(a, b"not a zip", "key-a").json()["task_id"]
    assert _wait(a, bad)["status"] == "failed"
    assert _wait(b, bad)["status"] == "failed"
    got = requests.get(f"{b.url}/scratch/train/get", params={"task_id": bad}, timeout=10)
    assert got.status_code == 400 and "not a valid zip" in got.json()["error"]
    # No secret at rest: two authenticated trainings later, no file server A wrote holds a key.
    written = [p for p in a.log.parent.rglob("*") if p.is_file()]
    assert any(p.name.startswith("task-results") for p in written)  # BentoML's task database
    leaks = [str(p) for p in written for key in (b"key-a", b"key-b") if key in p.read_bytes()]
    assert not leaks, leaks
    assert (
        requests.get(f"{b.url}/scratch/train/status", params={"task_id": "unknown1"}, timeout=10).status_code
        == 404
    )
    assert (
        search(b, "scratch", (DEMO / "fashion/boot/google.png").read_bytes()).json()["version"]
        == on_a["version"]
    )


def test_two_replicas_upserting_at_once_lose_nothing(pair):
    """Both replicas take uploads at the same time into one bucket: compare-and-set on the pointer
    (S3 conditional writes), the loser re-applying on the new head; every item survives."""
    import threading

    a, b = pair
    photo = (DEMO / "fashion/boot/google.png").read_bytes()
    before = requests.get(f"{b.url}/scratch/items", params={"limit": 1}, timeout=10).json()["total"]
    r = requests.post(
        f"{a.url}/scratch/items", files={"images": ("x.png", photo)}, data={"label": "boot"}, timeout=60
    )
    assert r.status_code == 401  # items change the domain: the API key is needed on A
    errors: list[str] = []

    def upload(server, key: str | None, tag: str) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for i in range(8):
            r = requests.post(
                f"{server.url}/scratch/items",
                files={"images": (f"{tag}{i}.png", photo)},
                data={"label": "boot", "ids": f"{tag}/{i}"},
                headers=headers,
                timeout=120,
            )
            if r.status_code != 200:
                errors.append(r.text)

    threads = [
        threading.Thread(target=upload, args=(a, "key-a", "a")),
        threading.Thread(target=upload, args=(b, None, "b")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    want = {f"{tag}/{i}" for tag in "ab" for i in range(8)}
    for server in (a, b):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            page = requests.get(f"{server.url}/scratch/items", params={"limit": 1000}, timeout=10).json()
            if want <= {it["id"] for it in page["items"]}:
                break
            time.sleep(0.5)
        assert want <= {it["id"] for it in page["items"]}
        assert page["total"] == before + 16


def test_s3_down_keeps_serving_cached_version(pair, moto):
    _, b = pair
    before = search(b, "scratch", (DEMO / "fashion/boot/google.png").read_bytes()).json()["version"]
    moto.terminate()
    moto.wait(10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = {d["name"]: d for d in requests.get(f"{b.url}/domains", timeout=20).json()}
        if info["scratch"]["store_error"]:
            break
        time.sleep(1)
    assert info["scratch"]["store_error"] and info["scratch"]["version"] == before
    r = search(b, "scratch", (DEMO / "fashion/boot/google.png").read_bytes())
    assert r.status_code == 200 and r.json()["version"] == before
    assert requests.get(f"{b.url}/readyz", timeout=10).status_code == 200
