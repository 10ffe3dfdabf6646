"""Guards added after review: publish compare-and-set, corrupt pointers, declared zip entry counts."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from simserver.domain_config import Limits
from simserver.errors import Conflict, TooLarge
from simserver.index import DomainIndex, Item
from simserver.ingest import _declared_entries, read_zip
from simserver.repository import Repository
from simserver.store import LocalStore


def _index(version: str) -> DomainIndex:
    items = [Item(f"a/{i}.png", "a", f"k{i}", "image/png") for i in range(3)]
    return DomainIndex.build(
        np.eye(3, 4, dtype=np.float32), items, metric="cosine", encoder_id="e", version=version
    )


def test_publish_refuses_when_pointer_moved(tmp_path):
    repo = Repository(LocalStore(tmp_path))
    repo.publish("d", _index("v1"))
    repo.publish("d", _index("v2"), expected_previous="v1")
    with pytest.raises(Conflict, match="another build"):
        repo.publish("d", _index("v3"), expected_previous="v1")  # started before v2 landed
    assert repo.current_version("d") == "v2"
    repo.publish("e", _index("w1"), expected_previous=None)
    assert repo.current_version("e") == "w1"


def test_corrupt_pointer_is_an_error_not_untrained(tmp_path):
    store = LocalStore(tmp_path)
    store.put("domains/d/CURRENT", b"{not json")
    with pytest.raises(ValueError, match="corrupt pointer"):
        Repository(store).current_version("d")


def test_declared_entries_refused_before_parsing():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(50):
            zf.writestr(f"d{i}/", b"")  # folders: not files, but still directory entries to parse
    data = buf.getvalue()
    assert _declared_entries(data) == 50
    with pytest.raises(TooLarge, match="declares 50 entries"):
        read_zip(data, Limits(max_entries=10))
    assert _declared_entries(b"no zip here") is None
