"""Relevance scoring: margins from the served index equal the exact and the leave-one-out ones
used for calibration (checked against a brute-force index per left-out image), the threshold
rules, the Wilson interval, the likelihood site rule and the verdict's thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from simserver.index import DomainIndex, Item
from simserver.relevance import RelevanceConfig, margins_exact, score_neighbours, site_decision, site_rule
from simserver.relevance_calibration import choose_threshold, loo_margins, wilson


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


def clusters(n: int, seed: int = 0, d: int = 16) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    names = ["nut", "random", "olive"]
    centers = rng.normal(size=(3, d))
    labels = [names[i % 3] for i in range(n)]
    x = np.stack([centers[names.index(x)] + rng.normal(scale=1.0, size=d) for x in labels]).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


@pytest.mark.parametrize("metric", ["cosine", "l2", "ip", "l1"])
@pytest.mark.parametrize("top_k", [1, 5, 200])
def test_leave_one_out_margins_equal_a_search_of_an_index_without_the_image(metric, top_k):
    """Oracle: for every image, a real index of all the *other* images, searched for it."""
    x, labels = clusters(45, seed=1)
    items = [Item(f"{lab}/{i}.png", lab, f"k{i}", "image/png") for i, lab in enumerate(labels)]
    brute = []
    for i in range(len(x)):
        keep = [j for j in range(len(x)) if j != i]
        index = DomainIndex.build(
            x[keep], [items[j] for j in keep], metric=metric, encoder_id="e", version="v"
        )
        hits = index.search(x[i : i + 1], top_k)[0]
        brute.append(score_neighbours([h.label for h in hits], [h.score for h in hits], "nut").margin)
    np.testing.assert_allclose(loo_margins(x, labels, "nut", top_k, metric, chunk=7), brute, atol=1e-5)


def test_leave_one_out_of_tiny_sets():
    x, labels = clusters(2)
    assert loo_margins(x[:1], labels[:1], "nut", 5, "cosine").tolist() == [0.0]  # nothing to compare with
    pair = np.array([[1.0, 0.0], [0.8, 0.6]], np.float32)  # cosine 0.8
    nut, other = loo_margins(pair, ["nut", "random"], "nut", 5, "cosine")
    assert nut == pytest.approx(-0.8) and other == pytest.approx(0.8)  # each sees only the other


def brute_force_threshold(margins, is_target, objective):
    """Every cut between sorted margins, scored from scratch."""
    values = sorted(set(margins.tolist()), reverse=True)
    cuts = (
        [values[0] + 1e-6]
        + [(a + b) / 2 for a, b in zip(values, values[1:], strict=False)]
        + [values[-1] - 1e-6]
    )
    best = None
    for c in cuts:
        chosen = margins >= c
        tp, fp = int((chosen & is_target).sum()), int((chosen & ~is_target).sum())
        score = objective(tp, fp, int(is_target.sum()), int((~is_target).sum()))
        if best is None or score >= best[0]:  # ties: the lower cut
            best = (score, c)
    return best


def youden(tp, fp, pos, neg):
    return tp / pos - fp / neg


def f1(tp, fp, pos, neg):
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + (pos - tp))


@pytest.mark.parametrize("rule, objective", [("youden", youden), ("f1", f1)])
@pytest.mark.parametrize("seed", range(5))
def test_threshold_maximises_the_rule_like_a_brute_force_search(rule, objective, seed):
    rng = np.random.default_rng(seed)
    is_target = rng.random(40) < 0.3
    margins = np.round(np.where(is_target, rng.normal(0.1, 0.1, 40), rng.normal(-0.1, 0.1, 40)), 2)
    c = choose_threshold(margins, is_target, RelevanceConfig(rule=rule, precision=None))
    score, cut = brute_force_threshold(margins, is_target, objective)
    assert c["image_threshold"] == pytest.approx(cut, abs=1e-6) and c["method"] == "leave-one-out"
    chosen = margins >= c["image_threshold"]
    assert (
        c["true_positives"] == (chosen & is_target).sum()
        and c["false_positives"] == (chosen & ~is_target).sum()
    )
    assert objective(
        c["true_positives"], c["false_positives"], c["positives"], c["negatives"]
    ) == pytest.approx(score)
    assert c["recall"] == pytest.approx(c["true_positives"] / is_target.sum(), abs=1e-4)


def test_threshold_sits_midway_in_the_gap_and_reports_counts_with_intervals():
    margins = np.array([0.5, 0.4, 0.3, 0.1, -0.2, -0.3])
    is_target = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    c = choose_threshold(margins, is_target, RelevanceConfig())
    assert c["image_threshold"] == pytest.approx(0.2) and (c["recall"], c["false_positive_rate"]) == (
        1.0,
        0.0,
    )
    assert (c["positives"], c["negatives"], c["precision_floor"]) == (
        3,
        3,
        None,
    )  # 3 < min_positives: no floor
    lo, hi = c["recall_ci95"]
    assert hi == 1.0 and 0.4 < lo < 0.45  # Wilson, 3 of 3


def test_precision_floor_applies_only_with_enough_positives():
    # 30 targets at 0.5, then 10 others at 0.4 and 30 targets at 0.3, 60 others below: the best J
    # takes all targets (recall 1, fpr 1/7, precision 0.857); a 0.9 floor cuts at 0.45 instead.
    margins = np.array([0.5] * 30 + [0.4] * 10 + [0.3] * 30 + [-0.5] * 60)
    is_target = np.array([1] * 30 + [0] * 10 + [1] * 30 + [0] * 60, dtype=bool)
    free = choose_threshold(margins, is_target, RelevanceConfig(precision=0.9, min_positives=61))
    assert (
        free["precision_floor"] is None
        and free["recall"] == 1.0
        and free["image_threshold"] == pytest.approx(-0.1)
    )
    floored = choose_threshold(margins, is_target, RelevanceConfig(precision=0.9, min_positives=60))
    assert floored["precision_floor"] == 0.9 and floored["precision"] == 1.0 and floored["recall"] == 0.5
    assert floored["image_threshold"] == pytest.approx(0.45)
    unreachable = choose_threshold(
        np.array([0.1, 0.5]), np.array([True, False]), RelevanceConfig(min_positives=1)
    )
    assert unreachable["precision"] == 1.0 and unreachable["true_positives"] == 0  # the most precise cut
    empty = choose_threshold(
        np.array([0.2]), np.array([False]), RelevanceConfig(default_image_threshold=0.05)
    )
    assert empty["image_threshold"] == 0.05 and empty["method"] == "default"


def test_wilson_interval():
    assert wilson(0, 0) is None
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson(0, 20)[0] == 0.0 and wilson(20, 20)[1] == 1.0


def test_likelihood_site_threshold_follows_the_image_recall():
    cfg = RelevanceConfig()  # relevant_share 0.25, irrelevant_share 0.1
    cal = {"true_positives": 19, "false_positives": 0, "positives": 19, "negatives": 154}
    rule = site_rule(cal, cfg)
    basis = rule.basis
    assert rule.rule == "likelihood" and basis is not None
    r, f = 19.5 / 20, 0.5 / 155
    assert basis.expected_fraction_relevant == pytest.approx(f + 0.25 * (r - f))
    assert basis.expected_fraction_irrelevant == pytest.approx(f + 0.1 * (r - f))
    assert basis.expected_fraction_irrelevant < rule.threshold < basis.expected_fraction_relevant
    # The threshold is where the binomial log-likelihood ratio changes sign, for any site size.
    for n in (4, 8, 13, 50):
        for k in range(n + 1):
            llr = rule.log_likelihood_ratio(k, n)
            assert (llr >= 0) == (k / n >= rule.threshold) or abs(llr) < 1e-9
    # Half the target images missed: the site threshold comes down with the recall.
    weak = site_rule({**cal, "true_positives": 9}, cfg)
    assert weak.threshold < rule.threshold
    assert site_rule(cal, RelevanceConfig(site_rule="fixed")).threshold == 0.25
    assert site_rule({"image_threshold": 0.1, "method": "hold-out"}, cfg).rule == "fixed"  # an older version
    assert site_rule({**cal, "true_positives": 0, "false_positives": 100}, cfg).rule == "fixed"  # no evidence
    with pytest.raises(ValueError, match="irrelevant_share"):
        RelevanceConfig(relevant_share=0.2, irrelevant_share=0.2)


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
    assert (v["site_rule"], calibrated["site_rule"], asked["site_rule"]) == ("fixed", "fixed", "request")
    assert asked["site_threshold"] == 0.7 and v["log_likelihood_ratio"] is None and v["basis"] is None

    # A calibration with image-level counts: the likelihood rule, its basis and the LLR in the reply.
    counts = {
        "image_threshold": 0.1,
        "true_positives": 9,
        "false_positives": 1,
        "positives": 10,
        "negatives": 90,
    }
    weighed = judge_site(["a", "b", "c"], hits, "nut", cfg, calibration=counts).model_dump()
    rule = site_rule(counts, cfg)
    assert weighed["site_rule"] == "likelihood" and weighed["site_threshold"] == pytest.approx(
        rule.threshold, abs=1e-4
    )
    assert weighed["relevant"] is True and weighed["log_likelihood_ratio"] == pytest.approx(
        rule.log_likelihood_ratio(1, 3), abs=1e-4
    )
    assert weighed["basis"]["positives"] == 10 and weighed["basis"]["relevant_share"] == 0.25
    # The request's own image threshold has no calibrated recall: the config's fixed site threshold.
    own = judge_site(["a", "b", "c"], hits, "nut", cfg, calibration=counts, image_threshold=0.5).model_dump()
    assert own["site_rule"] == "fixed" and own["site_threshold"] == 0.25 and own["relevant"] is False


def _look_alike_set(seed: int = 0, n_target: int = 12, n_other: int = 60, dim: int = 24):
    """Target vectors and look-alikes that share most of their direction with them: a linear
    probe separates them along the one axis they differ on, nearest neighbours do less well."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=dim)
    axis = np.zeros(dim)
    axis[0] = 1.0
    t = base + 0.8 * axis + rng.normal(scale=0.6, size=(n_target, dim))
    o = base - 0.8 * axis + rng.normal(scale=0.6, size=(n_other, dim))
    vectors = np.concatenate([t, o]).astype(np.float32)
    labels = np.asarray(["nut"] * n_target + ["other"] * n_other)
    return vectors, labels


def test_probe_calibration_scores_every_image_by_a_probe_fitted_without_it(monkeypatch):
    """Oracle: every fitted probe is recorded with the rows it trained on; every score the
    calibration uses comes from a probe that did not train on that image (its views included),
    each image is scored exactly once (and each view once), and the threshold is the rule's on
    those scores. The served probe trains on every image."""
    import simserver.calibration as calibration_module
    from simserver.calibration import CalibrationData, RelevanceCalibrator, ScoredPart
    from simserver.domain_config import DomainConfig
    from simserver.evaluation import stratified_split
    from simserver.relevance import Probe, fit_probe

    vectors, labels = _look_alike_set()
    rng = np.random.default_rng(1)
    owner = np.repeat(np.arange(len(labels)), 2)  # two views per image
    views = (vectors[owner] + rng.normal(scale=0.05, size=(len(owner), vectors.shape[1]))).astype(np.float32)
    fits: list[np.ndarray] = []
    scored: list[tuple[int, np.ndarray]] = []  # (fit number, rows scored)

    def recording_fit(x, y, c):
        fits.append(np.asarray(x))
        probe = fit_probe(x, y, c)
        number = len(fits) - 1

        class Recorder(Probe):
            def score(self, v):
                scored.append((number, np.asarray(v)))
                return super().score(v)

        return Recorder(probe.weights, probe.bias)

    monkeypatch.setattr(calibration_module, "fit_probe", recording_fit)
    cfg = DomainConfig(name="shop", target_label="nut")
    split = stratified_split(labels.tolist(), 0.2, 0)
    data = CalibrationData(
        cfg, split, vectors, labels, [ScoredPart(np.arange(len(labels)), vectors, views, owner)]
    )
    out = RelevanceCalibrator().calibrate(data)
    assert out["scorer"] == "probe" and out["method"] == "cross-fitted probe, 5 folds"
    assert len(fits) == 6 and len(fits[-1]) == len(labels)  # 5 folds + the served probe (every image)

    def rows_of(x: np.ndarray, table: np.ndarray) -> set[int]:
        return {int(np.flatnonzero((table == r).all(1))[0]) for r in x}

    seen_images: list[int] = []
    seen_views: list[int] = []
    for number, x in scored:
        trained_on = rows_of(fits[number], vectors)
        in_table = [(vectors == r).all(1).any() for r in x]
        if all(in_table):
            rows = rows_of(x, vectors)
            assert not rows & trained_on
            seen_images += sorted(rows)
        else:
            rows = rows_of(x, views)
            assert not {int(owner[r]) for r in rows} & trained_on  # a view's image was not trained on
            seen_views += sorted(rows)
    assert sorted(seen_images) == list(range(len(labels))) and sorted(seen_views) == list(range(len(owner)))
    # Counts stay in images: each image and its two views weigh one.
    assert (out["positives"], out["negatives"], out["scored"]) == (12, 60, 72 * 3)
    assert out["recall"] >= 0.9 and out["false_positive_rate"] <= 0.1 and len(out["probe"]["weights"]) == 24


def test_probe_separates_look_alikes_the_margin_confuses():
    """On look-alikes (same direction but one axis), the cross-fitted probe's calibration finds a
    better Youden's J than the kNN margin's on the same images."""
    from simserver.calibration import CalibrationData, RelevanceCalibrator
    from simserver.domain_config import DomainConfig
    from simserver.evaluation import stratified_split

    vectors, labels = _look_alike_set(seed=3, n_target=20, n_other=100, dim=64)
    split = stratified_split(labels.tolist(), 0.2, 0)
    j = {}
    for scorer in ("probe", "margin"):
        cfg = DomainConfig(name="shop", target_label="nut", relevance={"scorer": scorer})
        out = RelevanceCalibrator().calibrate(CalibrationData(cfg, split, vectors, labels))
        assert out["scorer"] == scorer and ("probe" in out) == (scorer == "probe")
        j[scorer] = out["recall"] - out["false_positive_rate"]
    assert j["probe"] > j["margin"] + 0.05, j


def test_probe_needs_two_target_images_else_margins():
    from simserver.calibration import CalibrationData, RelevanceCalibrator
    from simserver.domain_config import DomainConfig
    from simserver.evaluation import stratified_split

    vectors, labels = _look_alike_set(n_target=1, n_other=20)
    cfg = DomainConfig(name="shop", target_label="nut")
    out = RelevanceCalibrator().calibrate(
        CalibrationData(cfg, stratified_split(labels.tolist(), 0.2, 0), vectors, labels)
    )
    assert out["scorer"] == "margin" and "probe" not in out and out["positives"] == 1


def test_judge_site_scores_by_the_versions_probe():
    from simserver.builder import public_relevance
    from simserver.relevance import Probe, fit_probe, judge_site
    from simserver.schemas import Hit

    vectors, labels = _look_alike_set()
    probe = fit_probe(vectors, labels == "nut", 1.0)
    again = Probe.from_json(probe.to_json())
    assert again is not None and np.allclose(again.score(vectors), probe.score(vectors), atol=1e-5)
    site = vectors[[0, 1, 20, 21]]
    hits = [[Hit(id="x", name="x", label="other", score=0.9, distance=0.1)]] * 4  # kNN says: no target
    cal = {"image_threshold": 0.5, "probe": probe.to_json()}
    cfg = RelevanceConfig()
    v = judge_site(["a", "b", "c", "d"], hits, "nut", cfg, calibration=cal, vectors=site).model_dump()
    expected = probe.score(site)
    assert v["scorer"] == "probe" and [i["similar"] for i in v["images"]] == (expected >= 0.5).tolist()
    assert [i["score"] for i in v["images"]] == pytest.approx(expected.tolist(), abs=1e-4)
    assert all(i["margin"] == pytest.approx(-0.9) for i in v["images"])  # still reported
    with pytest.raises(ValueError):
        judge_site(["a"], hits[:1], "nut", cfg, calibration=cal)  # a probe needs the vectors
    plain = judge_site(["a"], hits[:1], "nut", cfg, calibration={"image_threshold": -1.0}).model_dump()
    assert plain["scorer"] == "margin" and plain["images"][0]["score"] == pytest.approx(-0.9)
    shown = public_relevance({"image_threshold": 0.5, "probe": probe.to_json()})
    assert shown == {"image_threshold": 0.5, "probe": {"features": 24}}
