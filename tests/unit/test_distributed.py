"""The distributed build's listing (simserver/distributed.py) against the local reader as the oracle:
the same images, names, labels, ids and metadata, in the same order, from the same folder; and the
shards' rows back as a dataset. Ray itself runs in tests/integration/test_distributed.py."""

from __future__ import annotations

import pytest

from simserver.distributed import open_source, plan_source, shard_prefix
from simserver.domain_config import Limits
from simserver.errors import BadArchive
from simserver.ingest import read_folder
from tests.unit.conftest import BLUE, GREEN, RED, solid


def write(root, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


@pytest.mark.parametrize("wrapper", ["", "export/"])
def test_plan_lists_what_the_local_reader_reads(tmp_path, wrapper):
    write(
        tmp_path,
        {
            f"{wrapper}red/a.png": solid(RED),
            f"{wrapper}red/b.png": solid(RED),
            f"{wrapper}blue/a.png": solid(BLUE),
            f"{wrapper}blue-green/c.png": solid(GREEN),  # '-' sorts before '/': path order, not text order
            f"{wrapper}green/nested/d.png": solid(GREEN),
            f"{wrapper}.hidden/e.png": solid(GREEN),
            f"{wrapper}red/.DS_Store": b"x",
            f"{wrapper}metadata.csv": b"filename,id,colour\nred/a.png,sku-1,crimson\nc.png,,teal\na.png,,x\n",
        },
    )
    if not wrapper:  # (beside a wrapper folder it would make the folder a category)
        write(tmp_path, {"loose.png": solid(GREEN)})
    local = read_folder(tmp_path, Limits())
    plan = plan_source(open_source(str(tmp_path)))
    assert [(name, label, meta, item_id) for _, _, name, label, meta, item_id in plan.images] == [
        (s.name, s.label, s.metadata, s.id) for s in local.samples
    ]
    assert [r[0] for r in plan.images] == list(range(len(plan.images)))
    assert plan.skipped == local.skipped
    assert [s.name for s in plan.skipped] == ([] if wrapper else ["loose.png"])
    found = {name: (meta, item_id) for _, _, name, _, meta, item_id in plan.images}
    assert found["red/a.png"] == ({"colour": "crimson"}, "sku-1")
    assert found["blue-green/c.png"] == ({"colour": "teal"}, "blue-green/c.png")  # by its unique file name
    assert found["blue/a.png"] == ({}, "blue/a.png")  # a.png is ambiguous: no row by file name


def test_plan_digest_follows_the_listing_and_metadata(tmp_path):
    write(tmp_path, {"red/a.png": solid(RED), "blue/b.png": solid(BLUE)})
    first = plan_source(open_source(str(tmp_path))).digest
    assert plan_source(open_source(str(tmp_path))).digest == first
    write(tmp_path, {"metadata.csv": b"filename,colour\nred/a.png,crimson\n"})
    second = plan_source(open_source(str(tmp_path))).digest
    write(tmp_path, {"red/c.png": solid(RED)})
    assert len({first, second, plan_source(open_source(str(tmp_path))).digest}) == 3
    assert shard_prefix("fashion", "abc") == "domains/fashion/builds/abc/shards/"


def test_sources_that_hold_no_images_are_refused(tmp_path):
    with pytest.raises(BadArchive, match="is not a folder"):
        open_source(str(tmp_path / "missing"))
    write(tmp_path, {"loose.png": solid(RED)})
    with pytest.raises(BadArchive, match="no image"):
        plan_source(open_source(str(tmp_path)))


def test_a_published_build_prunes_the_domains_other_builds_shards(tmp_path):
    from simserver.distributed import prune_builds, shard_prefix
    from simserver.store import LocalStore

    store = LocalStore(tmp_path)
    builds = [("fashion", "new"), ("fashion", "old"), ("fashion", "older"), ("food", "old")]
    keys = {b: [f"{shard_prefix(*b)}{k:06d}.parquet" for k in range(3)] for b in builds}
    for build_keys in keys.values():
        for key in build_keys:
            store.put(key, b"shard")
    store.put("domains/fashion/CURRENT", b"v1")
    assert prune_builds(store, "fashion", "new") == 6  # old and older; food's are another domain's
    kept = ["domains/fashion/CURRENT", *keys[("fashion", "new")], *keys[("food", "old")]]
    assert sorted(store.list("domains/")) == sorted(kept)
    assert prune_builds(store, "fashion", "new") == 0
