"""simserver.sweep: crash leftovers removed at start-up, nothing else, nothing young."""

from __future__ import annotations

import os
import time
from pathlib import Path

from simserver.sweep import sweep

HOUR = 3600.0


def touch(path: Path, data: bytes = b"x", age: float = HOUR) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    t = time.time() - age
    os.utime(path, (t, t))
    return path


def test_old_leftovers_go_and_everything_else_stays(tmp_path):
    store, cache = tmp_path / "store", tmp_path / "cache"
    complete = touch(store / "domains/food/versions/v1/meta.json")
    touch(store / "domains/food/versions/v1/index.faiss")
    aborted = touch(store / "domains/food/versions/v2/.encoder.tar.abc123.tmp", b"y" * 1000, age=26 * HOUR)
    touch(store / "domains/food/versions/v2/encoder.tar", age=26 * HOUR)
    # Another server's training on this folder exported its encoder an hour ago: not swept yet.
    exporting = touch(store / "domains/food/versions/v4/encoder.tar")
    old_tmp = touch(store / "domains/food/.CURRENT.k2j3.tmp")
    young_tmp = touch(store / "domains/food/.CURRENT.zz99.tmp", age=5)
    publishing = touch(store / "domains/food/versions/v3/index.faiss", age=5)  # meta.json comes next
    image = touch(store / "domains/food/images/abc.png")
    pointer = touch(store / "domains/food/CURRENT")
    cache_tmp = touch(cache / "encoders/.tmp-q1w2e3/saved_model/saved_model.pb", b"z" * 500)
    cache_young = touch(cache / "encoders/.tmp-young/saved_model.pb", age=5)
    cached = touch(cache / "encoders/0123abcd/saved_model/saved_model.pb")

    swept = sweep(store, cache)

    assert not aborted.parent.exists() and not old_tmp.exists() and not cache_tmp.parent.parent.exists()
    assert swept.bytes >= 1500
    for kept in (complete, young_tmp, publishing, exporting, image, pointer, cache_young, cached):
        assert kept.exists(), kept


def test_no_store_root_for_s3_and_missing_folders_are_fine(tmp_path):
    cache = tmp_path / "cache"
    touch(cache / "x/.obj.abc.tmp")
    swept = sweep(None, cache)
    assert len(swept.files) == 1
    assert sweep(tmp_path / "missing", None).files == []
