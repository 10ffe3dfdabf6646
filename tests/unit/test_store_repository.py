"""Artifact store, versioned repository, live index swapping and the build pipeline (fake encoder)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from functools import partial

import numpy as np
import pytest

from simserver.builder import encode_images
from simserver.domain_config import DomainConfig, Limits
from simserver.index import DomainIndex, Item
from simserver.ingest import Sample, read_zip
from simserver.live import LiveIndex
from simserver.repository import image_key, new_version_id
from simserver.store import open_store
from simserver.training import train_domain
from tests.unit.conftest import BLUE, GREEN, RED, TEST_DATA, fake_encode, make_zip, solid


def tiny_index(version: str, n: int = 3, seed: int = 0) -> DomainIndex:
    vectors = np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)
    items = [Item(f"c/{i}.png", "c", f"domains/d/images/{i}.png", "image/png") for i in range(n)]
    return DomainIndex.build(vectors, items, metric="cosine", encoder_id="fake", version=version)


def files_on_disk(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


# -- LocalStore ------------------------------------------------------------------------------------


def test_put_get_exists_list(store):
    assert not store.exists("a/b.txt")
    store.put("a/b.txt", b"one")
    store.put("a/c/d.bin", b"\x00\x01")
    store.put("z.txt", b"")
    assert store.get("a/b.txt") == b"one"
    assert store.get("a/c/d.bin") == b"\x00\x01"
    assert store.get("z.txt") == b""
    assert store.exists("a/b.txt") and store.exists("z.txt")
    assert store.list("a") == ["a/b.txt", "a/c/d.bin"]
    assert store.list("a/c") == ["a/c/d.bin"]
    assert store.list("") == ["a/b.txt", "a/c/d.bin", "z.txt"]
    assert store.list("nothing/here") == []


def test_put_overwrites_atomically_and_leaves_no_temp_files(store):
    for i in range(5):
        store.put("dir/key.json", f"version {i}".encode())
    assert store.get("dir/key.json") == b"version 4"
    assert files_on_disk(store.root) == ["dir/key.json"]


def test_failed_put_keeps_old_bytes_and_cleans_up(store):
    store.put("k", b"old")
    with pytest.raises(TypeError):
        store.put("k", "not bytes")
    assert store.get("k") == b"old"
    assert files_on_disk(store.root) == ["k"]


def test_put_writes_through_a_temp_file_and_rename(store, monkeypatch):
    """Readers must never see a half-written file: the final path only appears via os.replace."""
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((os.path.basename(src), os.path.exists(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    store.put("a/new.bin", b"x" * 1000)
    assert len(seen) == 1
    tmp_name, dst_existed = seen[0]
    assert tmp_name != "new.bin" and not dst_existed


@pytest.mark.parametrize("key", ["../x", "/abs", "a/../../x", "", ".", "a/.."])
def test_invalid_keys(store, key):
    with pytest.raises(ValueError):
        store.put(key, b"x")
    with pytest.raises(ValueError):
        store.get(key)
    with pytest.raises(ValueError):
        store.exists(key)
    assert not (store.root.parent / "x").exists()


def test_get_missing_raises_key_error(store):
    with pytest.raises(KeyError):
        store.get("missing/key")


def test_get_on_a_prefix_is_missing_like_exists_says(store):
    store.put("folder/file", b"x")
    assert not store.exists("folder")
    with pytest.raises(KeyError):
        store.get("folder")


def test_open_store(tmp_path, monkeypatch):
    assert open_store(f"file://{tmp_path}/abs").root == (tmp_path / "abs").resolve()
    assert open_store(str(tmp_path / "bare")).root == (tmp_path / "bare").resolve()
    monkeypatch.chdir(tmp_path)
    assert open_store("file://./rel/store").root == (tmp_path / "rel/store").resolve()
    with pytest.raises(ValueError, match="s3"):
        open_store("ftp://host/path")
    assert open_store(f"file://{tmp_path}/a#b?c").root == (tmp_path / "a#b?c").resolve()


# -- Repository ------------------------------------------------------------------------------------


def test_new_version_ids_are_sortable_and_unique():
    ids = [new_version_id() for _ in range(20)]
    assert len(set(ids)) == 20
    assert all(re.fullmatch(r"\d{8}T\d{9}-[0-9a-f]{6}", v) for v in ids)  # to the millisecond


def test_image_key_is_content_addressed():
    data = b"some image bytes"
    digest = hashlib.sha256(data).hexdigest()
    assert image_key("shop", data, "image/png") == f"domains/shop/images/{digest}.png"
    assert image_key("shop", data, "image/jpeg").endswith(f"{digest}.jpg")
    assert image_key("shop", data, "application/octet-stream").endswith(f"{digest}.bin")
    assert image_key("shop", b"other", "image/png") != image_key("shop", data, "image/png")


def test_publish_then_load_round_trip(repo):
    assert repo.current_version("d") is None
    index = tiny_index("v1")
    repo.publish("d", index)
    assert repo.current_version("d") == "v1"
    loaded = repo.load("d", "v1")
    assert {k: loaded.meta[k] for k in index.meta if k != "format"} == {
        k: v for k, v in index.meta.items() if k != "format"
    }
    assert loaded.meta["kind"] == "train" and loaded.items == index.items
    q = np.ones(8, dtype=np.float32)
    assert loaded.search(q[None], 3)[0] == index.search(q[None], 3)[0]
    assert repo.current_version("other") is None


def test_publish_writes_segment_then_manifest_then_pointer(repo, monkeypatch):
    keys = []
    real_put = repo.store.put
    monkeypatch.setattr(repo.store, "put", lambda k, d: (keys.append(k), real_put(k, d)))
    repo.publish("d", tiny_index("v1"))
    assert keys[-1] == "domains/d/CURRENT"
    assert keys[-2] == "domains/d/versions/v1/meta.json"
    seg = keys[0].split("/")[3]
    # a Flat base: items and vectors (exact scan, no FAISS file), the segment's meta.json last
    assert keys[:-2] == [f"domains/d/segments/{seg}/{n}" for n in ("items.json", "vectors.npy", "meta.json")]
    assert json.loads(repo.store.get("domains/d/CURRENT"))["version"] == "v1"


def test_format_1_versions_still_load(repo):
    """A version written before segments (index.faiss + items.json in the version folder)."""
    index = tiny_index("old")
    for name, data in index.to_files().items():
        repo.store.put(f"domains/d/versions/old/{name}", data)
    repo.store.put("domains/d/CURRENT", json.dumps({"version": "old"}).encode())
    loaded = repo.load("d", "old")
    assert loaded.count == 3 and [i.id for i in loaded.items] == [i.name for i in index.items]
    q = np.ones(8, dtype=np.float32)
    assert loaded.search(q[None], 3)[0] == index.search(q[None], 3)[0]


def test_failed_pointer_write_keeps_the_old_version(repo, monkeypatch):
    repo.publish("d", tiny_index("v1", seed=1))
    real_put = repo.store.put

    def failing_put(key, data):
        if key.endswith("/CURRENT"):
            raise OSError("disk full")
        real_put(key, data)

    monkeypatch.setattr(repo.store, "put", failing_put)
    with pytest.raises(OSError):
        repo.publish("d", tiny_index("v2", seed=2))
    assert repo.current_version("d") == "v1"
    assert repo.load("d", "v1").version == "v1"
    assert repo.store.exists("domains/d/versions/v2/meta.json")  # written, but never pointed at


def test_failed_version_write_never_moves_the_pointer(repo, monkeypatch):
    repo.publish("d", tiny_index("v1"))
    real_put = repo.store.put
    written = []

    def failing_put(key, data):
        written.append(key)
        if key.endswith("vectors.npy"):
            raise OSError("boom")
        real_put(key, data)

    monkeypatch.setattr(repo.store, "put", failing_put)
    with pytest.raises(OSError):
        repo.publish("d", tiny_index("v2"))
    assert "domains/d/CURRENT" not in written
    assert repo.current_version("d") == "v1"


def test_put_image_writes_once(repo, monkeypatch):
    calls = []
    real_put = repo.store.put
    monkeypatch.setattr(repo.store, "put", lambda k, d: (calls.append(k), real_put(k, d)))
    key = image_key("d", b"bytes", "image/png")
    repo.put_image(key, b"bytes")
    repo.put_image(key, b"bytes")
    assert calls == [key]
    assert repo.image(key) == b"bytes"


# -- LiveIndex -------------------------------------------------------------------------------------


def test_live_index_serves_nothing_until_published(repo):
    live = LiveIndex(repo, "d")
    assert live.refresh() is False
    assert live.current is None and live.last_error is None


def test_live_index_swaps_to_new_versions(repo):
    live = LiveIndex(repo, "d")
    repo.publish("d", tiny_index("v1"))
    assert live.refresh() is True
    assert live.current.version == "v1"
    assert live.refresh() is False  # same pointer: no reload
    repo.publish("d", tiny_index("v2", n=5))
    assert live.refresh() is True
    assert live.current.version == "v2" and len(live.current) == 5


def test_live_index_keeps_serving_when_load_fails(repo):
    live = LiveIndex(repo, "d")
    repo.publish("d", tiny_index("v1"))
    live.refresh()
    served = live.current
    repo.publish("d", tiny_index("v2"))
    seg = json.loads(repo.store.get("domains/d/versions/v2/meta.json"))["segments"][0]["id"]
    repo.store.put(f"domains/d/segments/{seg}/vectors.npy", b"garbage")  # corrupt the new version
    assert live.refresh() is False
    assert live.current is served and live.current.version == "v1"
    assert live.last_error
    served.search(np.ones(8)[None], 2)[0]  # still answers
    # A broken pointer is reported the same way.
    repo.store.put("domains/d/CURRENT", b"{not json")
    assert live.refresh() is False and live.current is served and live.last_error
    # Publishing a good version recovers and clears the error.
    repo.publish("d", tiny_index("v3"))
    assert live.refresh() is True
    assert live.current.version == "v3" and live.last_error is None


def test_live_index_missing_version_files(repo):
    live = LiveIndex(repo, "d")
    repo.publish("d", tiny_index("v1"))
    live.refresh()
    repo.store.put("domains/d/CURRENT", json.dumps({"version": "v-missing"}).encode())
    assert live.refresh() is False
    assert live.current.version == "v1"
    assert "KeyError" in live.last_error


def test_live_index_polls_in_the_background(repo):
    repo.publish("d", tiny_index("v1"))
    live = LiveIndex(repo, "d", poll_seconds=0.02)
    live.start()
    try:
        assert live.current.version == "v1"  # start() loads synchronously
        repo.publish("d", tiny_index("v2"))
        deadline = time.monotonic() + 5
        while live.current.version != "v2" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert live.current.version == "v2"
    finally:
        live.stop()
        live._thread.join(2)
    assert not live._thread.is_alive()


# -- builder ---------------------------------------------------------------------------------------


def _dataset():
    red, green, blue = solid(RED), solid(GREEN), solid(BLUE, size=(40, 20))
    photo = (TEST_DATA / "scissors1.webp").read_bytes()
    entries = {
        "warm/red.png": red,
        "warm/red-copy.png": red,  # same bytes under another name
        "cool/red-again.png": red,  # ... and in another category
        "cool/green.png": green,
        "cool/blue.png": blue,
        "tools/scissors.webp": photo,
        "tools/broken.png": b"not an image",
        "metadata.csv": b"filename,sku\ngreen.png,G1\n",
    }
    return read_zip(make_zip(entries), Limits()), {"red": red, "green": green, "blue": blue, "photo": photo}


def _pixels(sample: Sample) -> np.ndarray:
    return sample.pixels


def encode_dataset(ds, encode, batch_size=32, progress=None) -> np.ndarray:
    return np.stack(encode_images([partial(_pixels, s) for s in ds.samples], encode, batch_size, progress))


class PretrainedBackend:
    encoder = "fake"

    def __init__(self, encode, encoder_id: str) -> None:
        self.encode, self.encoder_id = encode, encoder_id


def build_domain(repo, domain, ds, *, encode, encoder_id, metric, batch_size=32):
    """A pretrained build: the training pipeline without a head (no fit, no export)."""
    cfg = DomainConfig(name=domain, metric=metric)
    backend = PretrainedBackend(encode, encoder_id)
    return train_domain(repo, cfg, ds, backend, mode="pretrained", batch_size=batch_size)


def test_encode_dataset_keeps_order_across_batches():
    ds, _ = _dataset()
    one_batch = encode_dataset(ds, fake_encode, batch_size=100)
    ticks = []
    small_batches = encode_dataset(ds, fake_encode, batch_size=2, progress=ticks.append)
    assert small_batches.dtype == np.float32 and small_batches.shape == (len(ds.samples), 32)
    np.testing.assert_allclose(small_batches, one_batch, atol=1e-4)
    for row, s in zip(small_batches, ds.samples, strict=True):
        np.testing.assert_allclose(row, fake_encode(s.pixels[None])[0], atol=1e-4)
    assert ticks == [2, 2, 2]


def test_build_domain_publishes_a_searchable_version(repo):
    ds, raw = _dataset()
    report = build_domain(
        repo, "shop", ds, encode=fake_encode, encoder_id="fake:1", metric="l2", batch_size=4
    )
    assert report.indexed == 6
    assert report.labels == {"cool": 3, "tools": 1, "warm": 2}
    assert [s.name for s in report.skipped] == ["tools/broken.png"]
    assert repo.current_version("shop") == report.version

    index = repo.load("shop", report.version)
    meta = index.meta
    assert (meta["count"], meta["labels"], meta["metric"], meta["encoder_id"], meta["dim"]) == (
        6,
        {"cool": 3, "tools": 1, "warm": 2},
        "l2",
        "fake:1",
        32,
    )
    assert meta["skipped"] == 1
    js = report.as_json()
    assert js["indexed"] == 6 and js["labels"] == report.labels and js["version"] == report.version
    assert [s["name"] for s in js["skipped"]] == ["tools/broken.png"] and js["skipped"][0]["reason"]
    json.dumps(js)

    # content-addressed images: 4 distinct byte strings -> 4 files, each under its sha256
    stored = repo.store.list("domains/shop/images")
    assert len(stored) == 4
    for data in raw.values():
        digest = hashlib.sha256(data).hexdigest()
        assert sum(digest in k for k in stored) == 1
    by_name = {i.name: i for i in index.items}
    assert by_name["warm/red.png"].image_key == by_name["cool/red-again.png"].image_key
    assert by_name["tools/scissors.webp"].image_key.endswith(".webp")
    for item in index.items:
        assert item.image_key in stored
        assert hashlib.sha256(repo.image(item.image_key)).hexdigest() in item.image_key
    assert by_name["cool/green.png"].metadata == {"sku": "G1"}

    # vectors line up with items: each distinct sample finds itself first
    for s in ds.samples:
        if s.name in ("cool/green.png", "cool/blue.png", "tools/scissors.webp"):
            top = index.search(fake_encode(s.pixels[None])[0][None], 1)[0][0]
            assert top.name == s.name and top.distance == pytest.approx(0, abs=1e-3)


def test_rebuild_reuses_stored_images_and_moves_the_pointer(repo, monkeypatch):
    ds, _ = _dataset()
    first = build_domain(repo, "shop", ds, encode=fake_encode, encoder_id="fake:1", metric="cosine")
    puts = []
    real_put = repo.store.put
    monkeypatch.setattr(repo.store, "put", lambda k, d: (puts.append(k), real_put(k, d)))
    time.sleep(0.001)
    second = build_domain(repo, "shop", ds, encode=fake_encode, encoder_id="fake:1", metric="cosine")
    assert second.version != first.version
    assert not [k for k in puts if "/images/" in k]
    assert repo.current_version("shop") == second.version
    assert repo.load("shop", first.version).version == first.version  # old versions stay loadable


def test_failed_encode_publishes_nothing(repo):
    ds, _ = _dataset()

    def broken(pixels):
        raise RuntimeError("model crashed")

    with pytest.raises(RuntimeError):
        build_domain(repo, "shop", ds, encode=broken, encoder_id="x", metric="cosine")
    assert repo.current_version("shop") is None
    assert repo.store.list("domains/shop") == []


def test_a_new_version_is_warmed_before_it_is_served(repo):
    seen = []
    live = LiveIndex(repo, "d", warm=lambda index: seen.append((index.version, live.current.version)))
    repo.publish("d", tiny_index("v1"))
    assert live.refresh() and seen == []  # the first version: readiness waits for it instead
    repo.publish("d", tiny_index("v2"))
    assert live.refresh() and seen == [("v2", "v1")]  # warmed while v1 still served
    assert live.current.version == "v2"


def test_a_failed_warm_up_still_serves_the_new_version(repo):
    def warm(index):
        raise TimeoutError("encoder service busy")

    live = LiveIndex(repo, "d", warm=warm)
    repo.publish("d", tiny_index("v1"))
    live.refresh()
    repo.publish("d", tiny_index("v2"))
    assert live.refresh() and live.current.version == "v2" and live.last_error is None
