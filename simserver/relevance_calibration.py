"""The numbers behind ``/relevance``'s two decisions, fitted once per training.

1. **Image threshold.** Every catalogue image is scored *leave-one-out*: its margin (see
   :mod:`simserver.relevance`) against the index of all the other images, exactly what a search of
   an index without it returns (:func:`loo_margins`). The threshold on those margins maximises
   Youden's J = recall - false-positive rate (or F1), placed midway between two adjacent margins.
   J is the right criterion for the site decision: a site whose share of target images is ``s``
   shows an expected fraction ``fpr + s * J`` of similar images, so the largest J separates
   relevant from irrelevant sites the most. A precision floor applies only when at least
   ``min_positives`` target images back it (a floor on 3 images is noise).
2. The site threshold follows from the counts this returns, at request time
   (:func:`simserver.relevance.site_rule`), so a changed ``relevant_share`` needs no retraining.

Recall and false-positive rate are reported with Wilson 95% intervals and the counts they rest on.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from simserver import metrics
from simserver.relevance import RelevanceConfig, distances

Z95 = 1.959964


def loo_margins(
    vectors: np.ndarray,
    labels: list[str] | np.ndarray,
    target: str,
    top_k: int,
    metric: str,
    chunk: int = 512,
    queries: np.ndarray | None = None,
    query_vectors: np.ndarray | None = None,
) -> np.ndarray:
    """The margin of each image of ``queries`` (indices; default all) against all the *other*
    images (its own row left out), by exact kNN over its ``top_k`` nearest: what a search of an
    index without it gives. ``query_vectors``: what to search with instead of the image's own
    row (an augmented view of image ``queries[i]``, say); that image is still left out."""
    n = len(vectors)
    lab = np.asarray(labels)
    is_target = lab == target
    which = np.arange(n) if queries is None else np.asarray(queries, dtype=np.int64)
    k = min(top_k, n - 1)
    out = np.zeros(len(which), dtype=np.float64)
    if k < 1:
        return out
    for start in range(0, len(which), chunk):
        at = np.arange(start, min(start + chunk, len(which)))
        rows = which[at]
        q = vectors[rows] if query_vectors is None else query_vectors[at]
        dist = distances(metric, q, vectors)
        dist[np.arange(len(rows)), rows] = np.inf  # leave the image itself out
        top = np.argpartition(dist, k - 1, axis=1)[:, :k] if k < n else np.argsort(dist, axis=1)
        # argpartition leaves the k nearest unordered: order them as a search would (stable).
        order = np.argsort(np.take_along_axis(dist, top, 1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, 1)
        scores = metrics.distance_to_score(metric, np.take_along_axis(dist, top, 1))
        hit = is_target[top]
        best_target = np.where(hit, scores, 0.0).max(axis=1)
        best_other = np.where(~hit, scores, 0.0).max(axis=1)
        out[at] = best_target - best_other
    return out


def wilson(successes: float, trials: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion (None without trials)."""
    if trials <= 0:
        return None
    p = successes / trials
    denom = 1 + z**2 / trials
    centre = (p + z**2 / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z**2 / (4 * trials**2)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _rounded(interval: tuple[float, float] | None) -> list[float] | None:
    return None if interval is None else [round(interval[0], 4), round(interval[1], 4)]


def choose_threshold(
    margins: np.ndarray,
    is_target: np.ndarray,
    config: RelevanceConfig,
    images: np.ndarray | None = None,
) -> dict[str, Any]:
    """The margin threshold (see the module docstring) and the counts at it. ``images``: the
    image each margin belongs to, when an image is scored several times (itself and augmented
    views of it); each image then weighs 1 in all, so counts are in images, not rows."""
    margins = np.asarray(margins, dtype=np.float64)
    is_target = np.asarray(is_target, dtype=bool)
    if images is None:
        weight = np.ones(len(margins))
    else:
        _, inverse, rows = np.unique(np.asarray(images), return_inverse=True, return_counts=True)
        weight = 1.0 / rows[inverse]
    pos, neg = round(float(weight[is_target].sum())), round(float(weight[~is_target].sum()))
    base: dict[str, Any] = {"rule": config.rule, "positives": pos, "negatives": neg, "scored": len(margins)}
    if pos == 0 or neg == 0:
        return {**base, "method": "default", "image_threshold": config.default_image_threshold}
    # Candidate cuts: above every margin, then midway below each distinct margin (descending);
    # a cut's counts are the weights of the margins at or above it.
    values = np.unique(margins)[::-1]
    cuts = np.concatenate([[values[0] + 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] - 1e-6]])
    at = np.searchsorted(-values, -margins)  # position of each margin among the distinct values
    w_target = np.bincount(at, weight * is_target, len(values))
    w_other = np.bincount(at, weight * ~is_target, len(values))
    tp = np.concatenate([[0.0], np.cumsum(w_target)])
    fp = np.concatenate([[0.0], np.cumsum(w_other)])
    recall, fpr = tp / pos, fp / neg
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-12), 1.0)
    if config.rule == "f1":
        score = np.where(tp > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    else:
        score = recall - fpr
    score = np.round(score, 9)  # float sums of weights: equal scores must compare equal
    floor = config.precision if config.precision is not None and pos >= config.min_positives else None
    allowed = precision >= floor - 1e-9 if floor is not None else np.ones(len(cuts), bool)
    if not allowed.any():
        allowed = precision == precision.max()  # the floor is out of reach: the most precise cut
    score = np.where(allowed, score, -np.inf)
    best = int(np.flatnonzero(score == score.max())[-1])  # ties: the lowest cut (more recall)
    t, p = round(float(tp[best]), 2), round(float(fp[best]), 2)
    return {
        **base,
        "method": "leave-one-out",
        "image_threshold": round(float(cuts[best]), 6),
        "true_positives": t,
        "false_positives": p,
        "recall": round(t / pos, 4),  # the counts are images' worth: fractional with views
        "recall_ci95": _rounded(wilson(t, pos)),
        "false_positive_rate": round(p / neg, 4),
        "false_positive_rate_ci95": _rounded(wilson(p, neg)),
        "precision": round(float(precision[best]), 4),
        "precision_floor": floor,
    }
