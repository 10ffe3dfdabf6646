from __future__ import annotations

import numpy as np

from simserver.augment import view


def test_views_are_deterministic_distinct_and_well_formed():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    a = view(pixels, "hash1", 0, seed=0)
    assert a.shape == pixels.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, view(pixels, "hash1", 0, seed=0))
    assert not np.array_equal(a, pixels)
    assert not np.array_equal(a, view(pixels, "hash1", 1, seed=0))
    assert not np.array_equal(a, view(pixels, "hash1", 0, seed=1))
    assert not np.array_equal(a, view(pixels, "hash2", 0, seed=0))
