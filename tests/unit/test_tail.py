"""simserver.tail without TensorFlow: the NumPy forward pieces and the flat packing."""

from __future__ import annotations

import numpy as np
import pytest

from simserver.finetune import Head
from simserver.tail import Tail, TailBlock, _depthwise, gem, pack_arrays, unpack_arrays


def _tail(rng, residual: bool = True, head: bool = True) -> Tail:
    c, mid, out = 6, 12, 10
    block = TailBlock(
        rng.normal(size=(c, mid)).astype(np.float32),
        rng.normal(size=mid).astype(np.float32),
        rng.normal(size=(3, 3, mid)).astype(np.float32),
        rng.normal(size=mid).astype(np.float32),
        rng.normal(size=(mid, c)).astype(np.float32),
        rng.normal(size=c).astype(np.float32),
        residual,
    )
    h = Head(rng.normal(size=(out, 4)).astype(np.float32), np.zeros(4, np.float32)) if head else None
    return Tail(
        [block], rng.normal(size=(c, out)).astype(np.float32), np.zeros(out, np.float32), 3.0, h, (5, 5, c)
    )


def test_depthwise_matches_a_naive_same_convolution():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 4, 3)).astype(np.float32)
    w = rng.normal(size=(3, 3, 3)).astype(np.float32)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.zeros_like(x)
    for n in range(2):
        for i in range(5):
            for j in range(4):
                want[n, i, j] = (padded[n, i : i + 3, j : j + 3] * w).sum(axis=(0, 1))
    np.testing.assert_allclose(_depthwise(x, w), want, rtol=1e-5, atol=1e-5)


def test_gem_is_average_at_p1_and_tends_to_the_maximum():
    x = np.abs(np.random.default_rng(1).normal(size=(3, 4, 4, 5))).astype(np.float32)
    np.testing.assert_allclose(gem(x, 1.0), x.mean(axis=(1, 2)), rtol=1e-6)
    assert np.all(gem(x, 3.0) > gem(x, 1.0))
    np.testing.assert_allclose(gem(x, 64.0), x.max(axis=(1, 2)), rtol=0.05)


def test_pack_round_trip_and_tail_apply():
    rng = np.random.default_rng(2)
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "long_name_b": np.float32([7.5])}
    back = unpack_arrays(pack_arrays(arrays))
    assert list(back) == list(arrays) and all(np.array_equal(back[k], arrays[k]) for k in arrays)
    for head in (True, False):
        tail = _tail(rng, head=head)
        maps = np.abs(rng.normal(size=(4, 5 * 5 * 6))).astype(np.float32)
        again = Tail.unpack(tail.pack())
        np.testing.assert_array_equal(again.apply(maps), tail.apply(maps))
        emb = tail.apply(maps)
        assert emb.shape == (4, 4 if head else 10)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_residual_adds_the_block_input():
    rng = np.random.default_rng(3)
    with_res, without = _tail(rng, residual=True), _tail(np.random.default_rng(3), residual=False)
    maps = rng.normal(size=(2, 150)).astype(np.float32)
    assert not np.allclose(with_res.pooled(maps), without.pooled(maps))
    with pytest.raises(ValueError):
        with_res.pooled(np.zeros((1, 7)))
