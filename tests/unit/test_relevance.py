"""Relevance scoring: margins from the served index equal the exact ones used for calibration,
the calibrated threshold meets its precision, and the site decision."""

from __future__ import annotations

import numpy as np
import pytest

from simserver.index import DomainIndex, Item
from simserver.relevance import calibrate, margins_exact, score_neighbours, site_decision


def test_score_neighbours():
    s = score_neighbours(["nut", "random", "nut", "olive"], [0.9, 0.8, 0.7, 0.6], "nut")
    assert (s.similarity, s.other) == (0.9, 0.8) and s.margin == pytest.approx(0.1)
    none = score_neighbours(["random", "olive"], [0.9, 0.5], "nut")
    assert none.similarity == 0.0 and none.margin == pytest.approx(-0.9)
    only = score_neighbours(["nut"], [0.4], "nut")
    assert only.other == 0.0 and only.margin == pytest.approx(0.4)


@pytest.mark.parametrize("metric", ["cosine", "l2", "ip", "l1"])
def test_served_margins_equal_exact_margins(metric):
    rng = np.random.default_rng(0)
    labels = ["nut", "random", "olive"]
    centers = rng.normal(size=(3, 16))
    gl = [labels[i % 3] for i in range(60)]
    g = np.stack([centers[labels.index(x)] + rng.normal(scale=0.8, size=16) for x in gl]).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = (centers[rng.integers(0, 3, 25)] + rng.normal(scale=0.8, size=(25, 16))).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    items = [Item(f"{x}/{i}.png", x, f"k{i}", "image/png") for i, x in enumerate(gl)]
    index = DomainIndex.build(g, items, metric=metric, encoder_id="e", version="v")
    served = [
        score_neighbours([h.label for h in hits], [h.score for h in hits], "nut").margin
        for hits in index.search(q, 7)
    ]
    np.testing.assert_allclose(served, margins_exact(q, g, gl, "nut", 7, metric), atol=1e-5)


def test_calibration_meets_the_precision_with_the_most_recall():
    margins = np.array([0.5, 0.4, 0.3, 0.2, 0.1, 0.35, 0.15, -0.2])
    is_target = np.array([1, 1, 1, 1, 1, 0, 0, 0], dtype=bool)
    # Cut at a target margin: 0.2 keeps 4 targets + 1 other (precision 0.8); 0.1 keeps 5 + 2
    # (0.714); 0.4 keeps 2 + 0 (1.0). The threshold then sits midway to the next lower margin.
    c = calibrate(margins, is_target, precision=0.75, default=0.0)
    assert (c["precision"], c["recall"], c["method"]) == (0.8, 0.8, "hold-out")
    assert c["image_threshold"] == pytest.approx((0.2 + 0.15) / 2)
    strict = calibrate(margins, is_target, precision=0.95, default=0.0)
    assert (strict["precision"], strict["recall"]) == (1.0, 0.4)
    assert strict["image_threshold"] == pytest.approx((0.4 + 0.35) / 2)
    loose = calibrate(margins, is_target, precision=0.5, default=0.0)
    assert loose["image_threshold"] == pytest.approx((0.1 - 0.2) / 2) and loose["recall"] == 1.0
    for cal in (c, strict, loose):  # the stated precision and recall hold at the returned threshold
        chosen = margins >= cal["image_threshold"]
        assert (chosen & is_target).sum() / chosen.sum() == pytest.approx(cal["precision"], abs=1e-4)
        assert (chosen & is_target).sum() / is_target.sum() == pytest.approx(cal["recall"], abs=1e-4)
    assert (loose["positives"], loose["negatives"]) == (5, 3)
    # Unreachable precision: the most precise threshold is used and its precision reported.
    hard = calibrate(np.array([0.1, 0.5]), np.array([True, False]), precision=0.9, default=0.0)
    assert hard["image_threshold"] == 0.1 and hard["precision"] == 0.5
    empty = calibrate(np.array([0.2]), np.array([False]), precision=0.9, default=0.05)
    assert empty["image_threshold"] == 0.05 and empty["method"] == "default"


def test_site_decision():
    similar, fraction, relevant = site_decision([0.3, -0.1, 0.0, 0.2], 0.1, 0.25)
    assert similar == [True, False, False, True] and fraction == 0.5 and relevant
    assert site_decision([0.3, -0.1, -0.2, -0.4, -0.5], 0.1, 0.25)[2] is False  # 20% < 25%
    assert site_decision([], 0.0, 0.0) == ([], 0.0, False)


def test_judge_site_thresholds_come_from_request_then_calibration_then_config():
    from simserver.relevance import RelevanceConfig, judge_site
    from simserver.schemas import Hit

    def hit(i: int, label: str, score: float) -> Hit:
        return Hit(
            id=f"{label}/{i}.png", name=f"{label}/{i}.png", label=label, score=score, distance=1 - score
        )

    hits = [
        [hit(1, "nut", 0.9), hit(2, "random", 0.7)],  # +0.2
        [hit(3, "random", 0.8), hit(1, "nut", 0.75)],  # -0.05
        [hit(4, "random", 0.9)],  # -0.9
    ]
    cfg = RelevanceConfig(default_image_threshold=0.0, site_threshold=0.25)
    v = judge_site(["a", "b", "c"], hits, "nut", cfg, nearest=1).model_dump()
    assert v["image_threshold"] == 0.0 and [i["similar"] for i in v["images"]] == [True, False, False]
    assert v["fraction"] == pytest.approx(1 / 3, abs=1e-4) and v["relevant"] is True
    assert v["images"][1]["margin"] == pytest.approx(-0.05) and v["images"][1]["similarity"] == 0.75
    assert [len(i["nearest"]) for i in v["images"]] == [1, 1, 1] and v["images"][0]["name"] == "a"
    calibrated = judge_site(
        ["a", "b", "c"], hits, "nut", cfg, calibration={"image_threshold": 0.3}
    ).model_dump()
    assert calibrated["image_threshold"] == 0.3 and calibrated["relevant"] is False
    asked = judge_site(
        ["a", "b", "c"],
        hits,
        "nut",
        cfg,
        calibration={"image_threshold": 0.3},
        image_threshold=-0.1,
        site_threshold=0.7,
    ).model_dump()
    assert asked["fraction"] == pytest.approx(2 / 3, abs=1e-4) and asked["relevant"] is False
