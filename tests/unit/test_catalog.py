"""The living catalog against an oracle: random add / replace / delete sequences, then every search
(filtered or not, "more like this") equals brute force over the expected catalog, for Flat, HNSW and
IVF-PQ bases; compaction, versions, activation, garbage collection and compare-and-set."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from simserver import items as ops
from simserver.catalog import CatalogPolicy
from simserver.domain_config import DomainConfig, VersionsConfig
from simserver.errors import Conflict, UnknownItem
from simserver.filters import BadFilter, parse_filter
from simserver.index import DomainIndex, Item
from simserver.index_choice import IndexPolicy
from simserver.ingest import Dataset, Sample
from simserver.repository import Repository, new_version_id
from simserver.store import LocalStore

DIM = 16
LABELS = ("dress", "coat", "shoe", "hat")
BRANDS = ("acme", "zeta", "nova")


def props(rng: np.random.Generator) -> tuple[str, dict[str, str]]:
    return str(rng.choice(LABELS)), {
        "brand": str(rng.choice(BRANDS)),
        "price": str(int(rng.integers(1, 100))),
    }


def sample(item_id: str, label: str, metadata: dict[str, str]) -> Sample:
    return Sample(f"{label}/{item_id}.png", label, item_id.encode(), "image/png", dict(metadata), id=item_id)


def brute(expected: dict, query: np.ndarray, k: int, filt=None, exclude=None, metric="cosine") -> list[str]:
    ids = [i for i in expected if i != exclude and (filt is None or matches(filt, *expected[i][1:]))]
    if not ids:
        return []
    x = np.stack([expected[i][0] for i in ids]).astype(np.float64)
    q = query.astype(np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        d = 1 - x @ (q / np.linalg.norm(q))
    else:
        d = np.sqrt(((x - q) ** 2).sum(axis=1))
    return [ids[j] for j in np.argsort(d, kind="stable")[:k]]


def matches(filt: dict, label: str, metadata: dict[str, str]) -> bool:
    for key, spec in filt.items():
        value = label if key == "label" else metadata.get(key.removeprefix("metadata."), "")
        if not isinstance(spec, dict):
            spec = {"eq": spec}
        for op, v in spec.items():
            if op == "eq" and (value != str(v) if isinstance(v, str) else float(value) != v):
                return False
            if op == "in" and value not in v:
                return False
            if op in ("gte", "lt") and (float(value) < v if op == "gte" else float(value) >= v):
                return False
    return True


FILTERS = [
    None,
    {"label": "dress"},
    {"label": {"in": ["coat", "hat"]}},
    {"metadata.brand": "acme", "metadata.price": {"gte": 20, "lt": 70}},
    {"metadata.price": {"lt": 4}},  # very selective
]


def make_cfg(kind: str, metric: str = "cosine") -> DomainConfig:
    return DomainConfig(
        name="d",
        metric=metric,
        index=IndexPolicy(kind=kind, ivf_nprobe=64),
        catalog=CatalogPolicy(
            exact_scan_max=8, compact_max_deltas=5, compact_min_rows=40, compact_dead_fraction=0.3
        ),
    )


def commit_upsert(repo, cfg, batch: dict) -> None:
    ds = Dataset([sample(i, lab, meta) for i, (_, lab, meta) in batch.items()], [])
    vectors = np.stack([v for v, _, _ in batch.values()])
    ops._commit_upsert(repo, cfg, ds, vectors, cfg.encoder, DIM)


def base_index(cfg: DomainConfig, expected: dict) -> DomainIndex:
    items = [
        Item(f"{lab}/{i}.png", lab, f"k/{i}", "image/png", meta, i) for i, (_, lab, meta) in expected.items()
    ]
    vectors = np.stack([v for v, _, _ in expected.values()])
    return DomainIndex.build(
        vectors, items, metric=cfg.metric, encoder_id="fake", version=new_version_id(), policy=cfg.index
    )


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_oracle_random_add_replace_delete(tmp_path, kind):
    rng = np.random.default_rng({"flat": 1, "hnsw": 2, "ivfpq": 3}[kind])
    cfg = make_cfg(kind)
    repo = Repository(LocalStore(tmp_path, durable=False), cfg.catalog)
    expected: dict[str, tuple[np.ndarray, str, dict[str, str]]] = {}
    for n in range(400):
        expected[f"item/{n}"] = (rng.standard_normal(DIM).astype(np.float32), *props(rng))
    repo.publish("d", base_index(cfg, expected))
    next_id = 400
    ops_done = 0
    while ops_done < 240:
        op = rng.choice(["add", "replace", "delete", "delete_filter"], p=[0.4, 0.3, 0.25, 0.05])
        if op == "add" or not expected:
            batch = {}
            for _ in range(int(rng.integers(1, 6))):
                batch[f"new/{next_id}"] = (rng.standard_normal(DIM).astype(np.float32), *props(rng))
                next_id += 1
            commit_upsert(repo, cfg, batch)
            expected.update(batch)
        elif op == "replace":
            ids = rng.choice(sorted(expected), size=min(3, len(expected)), replace=False)
            batch = {str(i): (rng.standard_normal(DIM).astype(np.float32), *props(rng)) for i in ids}
            commit_upsert(repo, cfg, batch)
            expected.update(batch)
        elif op == "delete":
            ids = [str(i) for i in rng.choice(sorted(expected), size=min(4, len(expected)), replace=False)]
            reply, _ = ops.delete(repo, "d", ids + ["never/existed"])
            assert reply.deleted == len(ids)
            for i in ids:
                del expected[i]
        else:
            brand = str(rng.choice(BRANDS))
            price = int(rng.integers(1, 100))
            filt = {"metadata.brand": brand, "metadata.price": {"gte": price, "lt": price + 3}}
            reply, _ = ops.delete(repo, "d", filt=parse_filter(filt))
            gone = [i for i, (_, lab, meta) in expected.items() if matches(filt, lab, meta)]
            assert reply.deleted == len(gone)
            for i in gone:
                del expected[i]
        ops_done += 1
        if ops_done % 17 == 0:
            ops.compact(repo, cfg)
        if ops_done % 60 == 0 or ops_done == 240:
            check(repo, cfg, expected, rng)
    history = [m["kind"] for m in repo.versions("d")]
    assert "compact" in history and history[-1] == "train"


def check(repo, cfg, expected, rng) -> None:
    catalog = repo.load("d", repo.current_version("d"))
    assert catalog.count == len(expected)
    assert {it.id for it in catalog.items} == set(expected)
    for item_id in rng.choice(sorted(expected), size=5, replace=False):
        item_id = str(item_id)
        assert catalog.get(item_id).label == expected[item_id][1]
        np.testing.assert_allclose(
            catalog.vector(item_id), expected[item_id][0] / np.linalg.norm(expected[item_id][0]), atol=1e-5
        )
    queries = rng.standard_normal((6, DIM)).astype(np.float32)
    for filt in FILTERS:
        got = catalog.search(queries, 10, parse_filter(filt))
        for q, hits in zip(queries, got, strict=True):
            assert [h.id for h in hits] == brute(expected, q, 10, filt), filt
    # "more like this": the stored vector, the item itself excluded
    for item_id in rng.choice(sorted(expected), size=3, replace=False):
        item_id = str(item_id)
        hits = catalog.search(
            catalog.vector(item_id)[None], 5, parse_filter({"label": "dress"}), exclude=item_id
        )[0]
        assert [h.id for h in hits] == brute(
            expected, expected[item_id][0], 5, {"label": "dress"}, exclude=item_id
        )


# -- versions, activation, GC --------------------------------------------------------------------------
def small_domain(tmp_path, keep: int = 10):
    cfg = DomainConfig(name="d", index=IndexPolicy(kind="flat"), versions=VersionsConfig(keep=keep))
    repo = Repository(LocalStore(tmp_path), cfg.catalog)
    rng = np.random.default_rng(0)
    expected: dict[str, tuple[np.ndarray, str, dict[str, str]]] = {
        f"a/{i}": (rng.standard_normal(DIM).astype(np.float32), "dress", {}) for i in range(10)
    }
    repo.publish("d", base_index(cfg, expected))
    return cfg, repo, rng


def test_versions_activate_and_garbage_collection(tmp_path):
    cfg, repo, rng = small_domain(tmp_path)
    trained = repo.current_version("d")
    commit_upsert(repo, cfg, {"b/1": (rng.standard_normal(DIM).astype(np.float32), "coat", {"x": "1"})})
    ops.delete(repo, "d", ["a/0"], must_exist=True)
    with pytest.raises(UnknownItem):
        ops.delete(repo, "d", ["a/0"], must_exist=True)
    infos = ops.version_infos(repo, "d")
    assert [v.kind for v in infos] == ["delete", "items", "train"]
    assert [v.count for v in infos] == [10, 11, 10] and [v.active for v in infos] == [True, False, False]
    back = repo.activate("d", trained)
    assert back.count == 10 and back.get("a/0") is not None and back.get("b/1") is None
    assert ops.version_infos(repo, "d")[0].kind == "activate"
    with pytest.raises(UnknownItem):
        repo.activate("d", "no-such-version")
    # keep=2: only the two newest versions and what they reference survive (no grace here)
    removed = repo.collect_garbage("d", keep=2, grace_seconds=0)
    assert removed["versions"] == 2
    left = [m["version"] for m in repo.versions("d")]
    assert len(left) == 2 and left[0] == repo.current_version("d")
    assert repo.load("d", repo.current_version("d")).count == 10
    segs = {k.split("/")[3] for k in repo.store.list("domains/d/segments")}
    assert len(segs) == 2  # the trained base (served again) and the upload's delta (still in a kept version)
    assert len(repo.store.list("domains/d/images")) == 1  # b/1's: the kept delete version still has it
    # grace: a fresh blob is never deleted
    commit_upsert(repo, cfg, {"c/1": (rng.standard_normal(DIM).astype(np.float32), "coat", {})})
    repo.collect_garbage("d", keep=1, grace_seconds=3600)
    assert repo.load("d", repo.current_version("d")).get("c/1") is not None
    assert any("/images/" in k for k in repo.store.list("domains/d"))


def test_training_refuses_only_another_training(tmp_path):
    cfg, repo, rng = small_domain(tmp_path)
    started = repo.current_version("d")
    commit_upsert(repo, cfg, {"b/1": (rng.standard_normal(DIM).astype(np.float32), "coat", {})})
    expected = {f"n/{i}": (rng.standard_normal(DIM).astype(np.float32), "hat", {}) for i in range(3)}
    repo.publish("d", base_index(cfg, expected), expected_previous=started)  # uploads meanwhile: fine
    assert repo.load("d", repo.current_version("d")).count == 3
    with pytest.raises(Conflict, match="another build"):
        repo.publish("d", base_index(cfg, expected), expected_previous=started)


def test_concurrent_writers_lose_nothing(tmp_path):
    """Four writers (threads, each its own Repository as a replica would be) upsert at once."""
    cfg, repo, rng = small_domain(tmp_path)
    vectors = rng.standard_normal((4, 15, DIM)).astype(np.float32)

    def writer(w: int) -> None:
        mine = Repository(LocalStore(tmp_path), cfg.catalog)
        for j in range(15):
            commit_upsert(mine, cfg, {f"w{w}/{j}": (vectors[w, j], "coat", {})})

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    catalog = repo.load("d", repo.current_version("d"))
    assert catalog.count == 10 + 60
    assert all(catalog.get(f"w{w}/{j}") is not None for w in range(4) for j in range(15))


def test_compare_and_set_on_the_local_store(tmp_path):
    store = LocalStore(tmp_path)
    assert store.get_tagged("p") is None
    assert store.put_if("p", b"1", None) and not store.put_if("p", b"2", None)
    _, tag = store.get_tagged("p")
    assert store.put_if("p", b"2", tag) and not store.put_if("p", b"3", tag)
    assert store.get("p") == b"2" and store.list("") == ["p"]  # no lock file listed


def test_compaction_tiers_keep_every_item(tmp_path):
    cfg, repo, rng = small_domain(tmp_path)
    cfg = cfg.model_copy(update={"catalog": CatalogPolicy(compact_max_deltas=2, compact_min_rows=1000)})
    repo.policy = cfg.catalog
    for j in range(3):
        commit_upsert(repo, cfg, {f"d/{j}": (rng.standard_normal(DIM).astype(np.float32), "coat", {})})
    head = repo.load("d", repo.current_version("d"))
    assert ops.plan_compaction(head, cfg.catalog).tier == "minor"
    after = ops.compact(repo, cfg)
    assert len(after.segments) == 2 and after.count == 13
    assert ops.compact(repo, cfg) is None  # nothing left to do
    major = ops.compact(repo, cfg, force="major")
    assert len(major.segments) == 1 and major.count == 13 and major.meta["compaction"] == "major"


# -- filters ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, words",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ({"colour": "red"}, "unknown field"),
        ({"label": {"like": "d%"}}, "unknown operator"),
        ({"label": ["a", "b"]}, '"in"'),
        ({"metadata.price": {"gte": "ten"}}, "expected a number"),
        ({"label": {"in": []}}, "non-empty list"),
        ({"label": {}}, "empty operator"),
        ({"label": None}, "string or a number"),
    ],
)
def test_malformed_filters_say_what_is_wrong(raw, words):
    with pytest.raises(BadFilter, match=words) as exc:
        parse_filter(raw if isinstance(raw, str) else json.dumps(raw))
    assert exc.value.status == 400


def test_filter_round_trip_and_numbers():
    f = parse_filter({"label": {"in": ["a"]}, "metadata.price": {"gte": 10, "lt": 50}, "metadata.n": 7})
    assert parse_filter(f.to_json()) == f
    assert not parse_filter(None) and not parse_filter("") and not parse_filter({})


def test_training_with_catalog_merge_covers_the_merged_catalog(tmp_path):
    from simserver.training import merge_catalog, train_domain
    from tests.unit.conftest import BLUE, GREEN, RED, fake_encode, solid

    class Backend:
        encoder, encoder_id = "fake", "fake:1"

        def encode(self, images):
            return fake_encode(images)

    cfg = DomainConfig(name="d")
    repo = Repository(LocalStore(tmp_path), cfg.catalog)
    first = Dataset(
        [
            Sample("warm/red.png", "warm", solid(RED), "image/png"),
            Sample("cool/blue.png", "cool", solid(BLUE), "image/png"),
        ],
        [],
    )
    train_domain(repo, cfg, first, Backend(), mode="pretrained")
    update = Dataset(
        [
            Sample("cool/green.png", "cool", solid(GREEN), "image/png", id="cool/blue.png"),
            Sample("cool/new.png", "cool", solid(GREEN), "image/png"),
        ],
        [],
    )
    merged = merge_catalog(repo, cfg, update)
    assert sorted(s.id for s in merged.samples) == ["cool/blue.png", "cool/new.png", "warm/red.png"]
    assert next(s for s in merged.samples if s.id == "cool/blue.png").data == solid(GREEN)  # replaced
    report = train_domain(repo, cfg, merged, Backend(), mode="pretrained")
    catalog = repo.load("d", report.version)
    assert catalog.count == 3 and catalog.meta["kind"] == "train"
    assert repo.image(catalog.get("warm/red.png").image_key) == solid(RED)  # kept from the catalog


def test_pair_calibration_separates_same_label_pairs():
    from simserver.calibration import CalibrationData, PairCalibrator
    from simserver.evaluation import stratified_split

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, DIM)) * 3
    labels = np.array([f"c{i % 3}" for i in range(90)])
    vectors = np.stack([centres[i % 3] + rng.standard_normal(DIM) for i in range(90)]).astype(np.float32)
    split = stratified_split(labels.tolist(), 0.2, 2, 0)
    got = PairCalibrator().calibrate(CalibrationData(DomainConfig(name="d"), split, vectors, labels))
    assert got["roc_auc"] > 0.95 and got["balanced_accuracy"] > 0.9 and 0 < got["threshold"] < 1
    assert got["pairs"] == len(split.holdout) * len(split.train)
