"""Hold-out split and retrieval metrics, checked against a plain-Python oracle."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from simserver.evaluation import evaluate_retrieval, stratified_split


def oracle(q, ql, g, gl):
    """Per query: sort the gallery by cosine (ties by gallery order), then count by hand."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    r1 = r5 = 0
    aps = []
    for vec, label in zip(q, ql, strict=True):
        sims = [(-float(vec @ gv), j) for j, gv in enumerate(g)]
        ranked = [gl[j] for _, j in sorted(sims)]
        r1 += ranked[0] == label
        r5 += label in ranked[:5]
        r = sum(1 for x in gl if x == label)
        hits, total = 0, 0.0
        for i in range(r):
            if ranked[i] == label:
                hits += 1
                total += hits / (i + 1)
        aps.append(total / r)
    return r1 / len(q), r5 / len(q), sum(aps) / len(aps)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_oracle(seed):
    rng = np.random.default_rng(seed)
    labels = [f"c{i}" for i in range(6)]
    centers = rng.normal(size=(6, 16))
    gl = [labels[i % 6] for i in range(40)]
    g = np.stack([centers[labels.index(x)] + rng.normal(scale=1.2, size=16) for x in gl])
    ql = [labels[i % 6] for i in range(17)]
    q = np.stack([centers[labels.index(x)] + rng.normal(scale=1.2, size=16) for x in ql])
    got = evaluate_retrieval(q, ql, g, gl)
    r1, r5, mapr = oracle(q, ql, g, gl)
    assert got.recall_at_1 == pytest.approx(r1)
    assert got.recall_at_5 == pytest.approx(r5)
    assert got.map_at_r == pytest.approx(mapr)
    assert 0 < got.map_at_r < 1 and got.queries == 17
    assert got.recall_curve[0] == got.recall_at_1 and got.recall_curve == sorted(got.recall_curve)
    per_class = {c: np.mean([got.first_correct[i] == 0 for i in range(17) if ql[i] == c]) for c in labels}
    assert got.per_class_recall_at_1 == pytest.approx(per_class)


def test_perfect_and_hopeless_embeddings():
    g = np.eye(4, dtype=np.float32)
    perfect = evaluate_retrieval(g, list("abcd"), g, list("abcd"))
    assert (perfect.recall_at_1, perfect.map_at_r) == (1.0, 1.0)
    wrong = evaluate_retrieval(g, list("abcd"), g, list("bcda"))
    assert wrong.recall_at_1 == 0.0 and wrong.map_at_r == 0.0 and wrong.recall_at_5 == 1.0
    assert wrong.summary()["per_class_recall_at_1"] == {"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0}


def test_split_is_stratified_deterministic_and_keeps_a_gallery_per_class():
    labels = ["a"] * 10 + ["b"] * 3 + ["c"] * 1 + ["d"] * 2
    s = stratified_split(labels, fraction=0.2, min_per_class=1, seed=7)
    assert stratified_split(labels, 0.2, 1, 7).holdout.tolist() == s.holdout.tolist()
    held = Counter(labels[i] for i in s.holdout)
    kept = Counter(labels[i] for i in s.train)
    assert held == {"a": 2, "b": 1, "d": 1}  # c has a single image: it stays in training
    assert kept == {"a": 8, "b": 2, "c": 1, "d": 1}
    assert sorted(s.train.tolist() + s.holdout.tolist()) == list(range(len(labels)))
    assert stratified_split(labels, 0.2, 1, 8).holdout.tolist() != s.holdout.tolist()
    big = stratified_split(["x"] * 5, fraction=0.2, min_per_class=9)
    assert len(big.holdout) == 4 and len(big.train) == 1  # never the whole class
    assert not stratified_split(["a", "b", "c"]).evaluable


def test_point_estimate_promotion_rule():
    """``require_interval: false``: a higher Recall@1 (or a tie with a higher mAP@R) is enough."""
    from simserver.evaluation import Comparison, decide

    g = np.eye(3, dtype=np.float32)
    good = evaluate_retrieval(g, list("abc"), g, list("abc"))
    bad = evaluate_retrieval(g, list("abc"), g, list("bca"))

    def better(f, p):
        return decide(Comparison.of(f, p), None, require_interval=False)

    assert better(good, bad)[0] and not better(bad, good)[0]
    promoted, reason = better(good, good)
    assert not promoted and "does not beat" in reason


# -- intervals, open set, the promotion rule -------------------------------------------------------
def _result(hits: list[int], map_at_r: float = 0.5):
    from simserver.evaluation import RetrievalResult

    first = np.where(np.asarray(hits) == 1, 0, 3)
    r1 = float(np.mean(hits))
    return RetrievalResult(r1, r1, map_at_r, {}, [r1] * 10, len(hits), np.zeros((len(hits), 5)), first)


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_queries():
    from simserver.evaluation import bootstrap_interval

    small = bootstrap_interval(np.array([1, 0] * 10, float))
    large = bootstrap_interval(np.array([1, 0] * 500, float))
    assert small[0] < 0.5 < small[1] and large[0] < 0.5 < large[1]
    assert large[1] - large[0] < (small[1] - small[0]) / 4
    assert bootstrap_interval(np.ones(7)) == (1.0, 1.0)
    assert bootstrap_interval(np.array([1, 0, 1.0]), seed=3) == bootstrap_interval(
        np.array([1, 0, 1.0]), seed=3
    )


def test_open_set_split_holds_out_whole_categories():
    from simserver.evaluation import open_set_split

    labels = [c for c in "abcdefghij" for _ in range(3)] + ["k"]
    split = open_set_split(labels, 0.3, seed=1)
    held = set(split.held_classes)
    assert len(held) == 3 and "k" not in held  # a single-image category cannot be a query
    assert {labels[i] for i in split.holdout} == held
    assert not held & {labels[i] for i in split.train}
    assert sorted([*split.train, *split.holdout]) == list(range(len(labels)))
    assert not open_set_split(["a", "a", "b", "b"]).evaluable  # two categories: keep both


def test_open_set_metrics_are_leave_one_out_against_everything():
    from simserver.evaluation import OpenSplit, evaluate_open_set

    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(12, 6)).astype(np.float32)
    labels = ["a", "a", "a", "b", "b", "b", "c", "c", "c", "d", "d", "d"]
    split = OpenSplit(np.arange(6), np.arange(6, 12), ("c", "d"))
    res = evaluate_open_set(vecs, labels, split)
    v = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    hits, aps = [], []
    for q in range(6, 12):
        others = [j for j in range(12) if j != q]
        ranked = sorted(others, key=lambda j: (-(v[q] @ v[j]), j))
        rel = [labels[j] == labels[q] for j in ranked]
        hits.append(rel[0])
        r = 2
        aps.append(sum(sum(rel[: i + 1]) / (i + 1) for i in range(r) if rel[i]) / r)
    assert res.queries == 6 and res.recall_at_1 == pytest.approx(np.mean(hits))
    assert res.map_at_r == pytest.approx(np.mean(aps))


def test_decide_needs_the_interval_above_zero_and_open_set_within_tolerance():
    from simserver.evaluation import Comparison, decide

    pre = _result([1] * 20 + [0] * 20)
    better = _result([1] * 36 + [0] * 4)  # +40 points on 40 queries
    slightly = _result([1] * 21 + [0] * 19)  # +1 query
    ok, why = decide(Comparison.of(better, pre), None)
    assert ok and "promoted" in why and "interval" in why
    ok, why = decide(Comparison.of(slightly, pre), None)
    assert not ok and "not above 0" in why
    ok, _ = decide(Comparison.of(slightly, pre), None, require_interval=False)  # point estimate
    assert ok
    open_pre = _result([1] * 50 + [0] * 50)
    open_drop = _result([1] * 48 + [0] * 52)  # 2 points below pretrained
    open_same = _result([1] * 49 + [0] * 51)  # 1 point below: tolerated
    ok, why = decide(Comparison.of(better, pre), Comparison.of(open_drop, open_pre))
    assert not ok and "open-set" in why
    assert decide(Comparison.of(better, pre), Comparison.of(open_same, open_pre))[0]
    assert decide(Comparison.of(better, pre), Comparison.of(open_drop, open_pre), max_open_set_drop=None)[0]
    # promote_on=open_set: the open-set gain must be significant.
    ok, why = decide(Comparison.of(better, pre), Comparison.of(open_same, open_pre), promote_on="open_set")
    assert not ok and why.startswith("not promoted: open-set")


@pytest.mark.parametrize("seed", [0, 1])
def test_worst_queries_match_a_brute_force_ranking(seed):
    """Every query whose nearest gallery image has another label, worst first, against a hand ranking."""
    from simserver.evaluation import worst_queries

    rng = np.random.default_rng(seed)
    labels = ["a", "b", "c"]
    centers = rng.normal(size=(3, 8))
    gl = [labels[i % 3] for i in range(15)]
    g = np.stack([centers[labels.index(x)] + rng.normal(scale=1.5, size=8) for x in gl])
    ql = [labels[i % 3] for i in range(12)]
    q = np.stack([centers[labels.index(x)] + rng.normal(scale=1.5, size=8) for x in ql])
    qids, gids = [f"q{i:02d}" for i in range(12)], [f"g{j:02d}" for j in range(15)]
    got = worst_queries(evaluate_retrieval(q, ql, g, gl), qids, ql, gids, gl, n=100)

    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    expected = []
    for i in range(12):
        ranked = [j for _, j in sorted((-float(qn[i] @ gn[j]), j) for j in range(15))]
        rank = next(r for r, j in enumerate(ranked) if gl[j] == ql[i])
        if rank > 0:
            first = {"id": gids[ranked[0]], "label": gl[ranked[0]]}
            expected.append({"id": qids[i], "label": ql[i], "first": first, "correct_rank": rank + 1})
    expected.sort(key=lambda w: (-w["correct_rank"], w["id"]))
    assert expected and got == expected  # the noise makes some queries go wrong
    assert worst_queries(evaluate_retrieval(q, ql, g, gl), qids, ql, gids, gl, n=2) == expected[:2]


def test_worst_queries_of_a_perfect_embedding_is_empty_and_no_answer_is_none():
    from simserver.evaluation import worst_queries

    g = np.eye(3, dtype=np.float32)
    assert (
        worst_queries(
            evaluate_retrieval(g, list("abc"), g, list("abc")),
            list("xyz"),
            list("abc"),
            list("ijk"),
            list("abc"),
        )
        == []
    )
    # A query whose label no gallery image has: no rank to give.
    lost = worst_queries(
        evaluate_retrieval(g[:1], ["z"], g, list("abc")), ["x"], ["z"], list("ijk"), list("abc")
    )
    assert lost == [{"id": "x", "label": "z", "first": {"id": "i", "label": "a"}, "correct_rank": None}]
