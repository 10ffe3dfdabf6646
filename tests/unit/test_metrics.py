"""simserver.metrics: normalisation, FAISS raw values -> distances -> scores, pairwise distances."""

from __future__ import annotations

import numpy as np
import pytest

from simserver import metrics


def test_l2_normalize_gives_unit_rows():
    x = np.random.default_rng(0).standard_normal((50, 17)) * 40
    y = metrics.l2_normalize(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-6)
    # direction kept
    np.testing.assert_allclose(y * np.linalg.norm(x, axis=1, keepdims=True), x, rtol=1e-5, atol=1e-4)


def test_l2_normalize_single_vector():
    y = metrics.l2_normalize(np.array([3.0, 4.0]))
    np.testing.assert_allclose(y, [0.6, 0.8], atol=1e-7)


def test_l2_normalize_zero_vector_is_safe():
    x = np.zeros((3, 8))
    x[1, 2] = 5.0
    y = metrics.l2_normalize(x)
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y[0], 0.0)
    np.testing.assert_array_equal(y[2], 0.0)
    np.testing.assert_allclose(y[1, 2], 1.0)


@pytest.mark.parametrize("metric", ["l2", "l1"])
def test_distance_to_score_for_distances(metric):
    d = np.linspace(0, 1000, 2001)
    s = metrics.distance_to_score(metric, d)
    assert s[0] == pytest.approx(1.0)
    assert np.all((s > 0) & (s <= 1))
    assert np.all(np.diff(s) < 0)  # strictly decreasing


@pytest.mark.parametrize("metric", ["cosine", "ip"])
def test_distance_to_score_for_similarities(metric):
    d = np.linspace(0, 2, 401)  # cosine distance 1 - cos, cos in [-1, 1]
    s = metrics.distance_to_score(metric, d)
    assert s[0] == pytest.approx(1.0)
    assert np.all((s >= 0) & (s <= 1))
    assert np.all(np.diff(s) <= 0)
    assert np.all(np.diff(s[d < 1]) < 0)  # strictly decreasing while it can be
    assert metrics.distance_to_score(metric, 0.25) == pytest.approx(0.75)


@pytest.mark.parametrize("metric", metrics.METRICS)
def test_scores_stay_in_unit_interval_for_any_input(metric):
    d = np.array([-5.0, -1e-7, 0.0, 1e-7, 0.5, 3.0, 1e9])
    s = metrics.distance_to_score(metric, d)
    assert np.all((s >= 0) & (s <= 1))


def test_faiss_to_distance():
    np.testing.assert_allclose(metrics.faiss_to_distance("cosine", np.array([1.0, 0.5, -1.0])), [0, 0.5, 2])
    np.testing.assert_allclose(metrics.faiss_to_distance("ip", np.array([2.0])), [-1.0])
    np.testing.assert_allclose(metrics.faiss_to_distance("l2", np.array([9.0, 0.0, -1e-6])), [3.0, 0.0, 0.0])
    np.testing.assert_allclose(metrics.faiss_to_distance("l1", np.array([7.5])), [7.5])


@pytest.mark.parametrize("fn", [metrics.faiss_to_distance, metrics.distance_to_score])
def test_unknown_metric_is_refused(fn):
    with pytest.raises(ValueError, match="hamming"):
        fn("hamming", np.zeros(2))
    with pytest.raises(ValueError):
        metrics.pairwise_distance("hamming", np.ones(2), np.ones(2))


def test_pairwise_distance_matches_numpy_formulas():
    rng = np.random.default_rng(1)
    for _ in range(20):
        a, b = rng.standard_normal(64) * 3, rng.standard_normal(64) * 3
        cos = np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)
        assert metrics.pairwise_distance("cosine", a, b) == pytest.approx(1 - cos, abs=1e-6)
        assert metrics.pairwise_distance("ip", a, b) == pytest.approx(1 - np.dot(a, b), rel=1e-9)
        assert metrics.pairwise_distance("l2", a, b) == pytest.approx(np.sqrt(((a - b) ** 2).sum()), rel=1e-9)
        assert metrics.pairwise_distance("l1", a, b) == pytest.approx(np.abs(a - b).sum(), rel=1e-9)


def test_pairwise_distance_properties():
    a = np.random.default_rng(2).standard_normal((4, 8))  # any shape is flattened
    for metric in ("cosine", "l2", "l1"):
        assert metrics.pairwise_distance(metric, a, a) == pytest.approx(0.0, abs=1e-6)
    assert metrics.pairwise_distance("cosine", a, 5 * a) == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert metrics.pairwise_distance("cosine", a, -a) == pytest.approx(2.0, abs=1e-6)
    assert metrics.pairwise_distance("cosine", np.zeros(3), np.ones(3)) == pytest.approx(1.0)  # no NaN
    unit = metrics.l2_normalize(a.ravel())
    assert metrics.pairwise_distance("ip", unit, unit) == pytest.approx(0.0, abs=1e-6)
    assert isinstance(metrics.pairwise_distance("l2", a, a), float)
