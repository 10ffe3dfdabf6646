"""simserver/encoder.py without a model: the cache key of a SavedModel's conversion."""

from __future__ import annotations

import os


def test_a_saved_models_digest_covers_its_graph_and_its_variables_not_its_file_times(tmp_path):
    """The key of a SavedModel's cached conversion and reference vectors (simserver.encoder)."""
    from simserver.encoder import model_digest

    (tmp_path / "variables").mkdir()
    (tmp_path / "saved_model.pb").write_bytes(b"graph")
    (tmp_path / "variables" / "variables.index").write_bytes(b"checksums-1")
    first = model_digest(tmp_path)
    os.utime(tmp_path / "saved_model.pb", ns=(1, 1))
    assert model_digest(tmp_path) == first  # times are not content
    (tmp_path / "variables" / "variables.index").write_bytes(b"checksums-2")
    second = model_digest(tmp_path)
    assert second != first  # the same graph with other weights
    (tmp_path / "saved_model.pb").write_bytes(b"graph2")
    assert model_digest(tmp_path) not in (first, second)
