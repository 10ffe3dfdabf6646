"""Hold-out evaluation of an embedding: stratified split, Recall@K, mAP@R, per-class Recall@1.

Protocol: the hold-out images are the queries and the training images the gallery, which is how a
domain is used (new photos searched against the indexed ones). Ranking is by cosine similarity of
L2-normalised vectors (what the ``cosine`` metric and every built-in encoder use).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from simserver import metrics

CURVE_KS = tuple(range(1, 11))


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # indices into the dataset
    holdout: np.ndarray

    @property
    def evaluable(self) -> bool:
        return len(self.holdout) > 0


def stratified_split(
    labels: list[str], fraction: float = 0.2, min_per_class: int = 1, seed: int = 0
) -> Split:
    """Per class: ``max(min_per_class, round(fraction * n))`` images held out, always leaving at
    least one in training (so every query has a correct answer in the gallery). Classes with a
    single image stay whole in training. Deterministic for a given seed and label order."""
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    train: list[int] = []
    holdout: list[int] = []
    for label in sorted(by_class):
        idx = np.array(by_class[label])
        rng.shuffle(idx)
        n_hold = 0 if len(idx) < 2 else min(len(idx) - 1, max(min_per_class, round(fraction * len(idx))))
        holdout.extend(idx[:n_hold].tolist())
        train.extend(idx[n_hold:].tolist())
    return Split(np.array(sorted(train), dtype=np.int64), np.array(sorted(holdout), dtype=np.int64))


@dataclass
class RetrievalResult:
    recall_at_1: float
    recall_at_5: float
    map_at_r: float
    per_class_recall_at_1: dict[str, float]
    recall_curve: list[float]  # Recall@K for K in CURVE_KS
    queries: int
    # Per query: gallery indices of the top 5 and the rank (0-based) of the first correct one.
    top5: np.ndarray
    first_correct: np.ndarray

    def summary(self) -> dict:
        return {
            "recall_at_1": round(self.recall_at_1, 4),
            "recall_at_5": round(self.recall_at_5, 4),
            "map_at_r": round(self.map_at_r, 4),
            "per_class_recall_at_1": {k: round(v, 4) for k, v in self.per_class_recall_at_1.items()},
            "queries": self.queries,
        }


def evaluate_retrieval(
    query_vecs: np.ndarray, query_labels: list[str], gallery_vecs: np.ndarray, gallery_labels: list[str]
) -> RetrievalResult:
    q = metrics.l2_normalize(query_vecs)
    g = metrics.l2_normalize(gallery_vecs)
    ql = np.asarray(query_labels)
    gl = np.asarray(gallery_labels)
    if len(q) == 0 or len(g) == 0:
        raise ValueError("evaluation needs at least one query and one gallery vector")
    # Stable sort on -similarity: ties keep gallery order, so results are reproducible.
    order = np.argsort(-(q @ g.T), axis=1, kind="stable")
    return _rank_metrics(order, ql, gl, Counter(gl.tolist()))


def _rank_metrics(
    order: np.ndarray, ql: np.ndarray, gl: np.ndarray, counts: Counter, leave_one_out: bool = False
) -> RetrievalResult:
    """Metrics of ranked gallery indices ``order`` [Q, G]; ``leave_one_out``: each query is itself
    in ``counts`` (and not in its row), so it has one relevant item fewer."""
    relevant = gl[order] == ql[:, None]  # [Q, G] in rank order
    hits_any = np.cumsum(relevant, axis=1) > 0
    kmax = min(max(CURVE_KS), relevant.shape[1])
    curve = [float(hits_any[:, min(k, kmax) - 1].mean()) for k in CURVE_KS]
    aps = []
    for row, label in zip(relevant, ql, strict=True):
        r = counts.get(label, 0) - int(leave_one_out)
        if r <= 0:
            aps.append(0.0)
            continue
        top = row[:r]
        precision_at_i = np.cumsum(top) / np.arange(1, r + 1)
        aps.append(float((precision_at_i * top).sum() / r))
    first = np.where(relevant.any(axis=1), relevant.argmax(axis=1), relevant.shape[1])
    per_class = {}
    for label in sorted(set(ql.tolist())):
        per_class[label] = float(relevant[ql == label, 0].mean())
    return RetrievalResult(
        recall_at_1=curve[0],
        recall_at_5=curve[4],
        map_at_r=float(np.mean(aps)),
        per_class_recall_at_1=per_class,
        recall_curve=curve,
        queries=len(ql),
        top5=order[:, :5],
        first_correct=first,
    )


# -- the queries that went wrong ------------------------------------------------------------------
WORST_QUERIES = 8  # how many the training reply lists (what the web interface shows)


def worst_order(result: RetrievalResult, names: list[str], n: int) -> list[int]:
    """Indices of the ``n`` queries whose first correct result is furthest down (ties by name)."""
    return sorted(range(len(names)), key=lambda i: (-int(result.first_correct[i]), names[i]))[:n]


def worst_queries(
    result: RetrievalResult,
    query_ids: list[str],
    query_labels: list[str],
    gallery_ids: list[str],
    gallery_labels: list[str],
    n: int = WORST_QUERIES,
) -> list[dict]:
    """The hold-out queries whose first result has another label, worst first: each query's id and
    label, its wrong first result, and the rank (1 = first) of its first result with the right label
    (None if no gallery image has it). Ids, so a reader can look both images up in the catalog."""
    wrong = [i for i in worst_order(result, query_ids, len(query_ids)) if result.first_correct[i] > 0]
    out = []
    for i in wrong[:n]:
        first = int(result.top5[i][0])
        rank = int(result.first_correct[i])
        out.append(
            {
                "id": query_ids[i],
                "label": query_labels[i],
                "first": {"id": gallery_ids[first], "label": gallery_labels[first]},
                "correct_rank": rank + 1 if rank < len(gallery_ids) else None,
            }
        )
    return out


# -- small-set statistics and open-set evaluation ---------------------------------------------------
def hits_at_1(result: RetrievalResult) -> np.ndarray:
    """Per query: 1.0 if its nearest gallery item has its label."""
    return (result.first_correct == 0).astype(np.float64)


def bootstrap_interval(
    values: np.ndarray, samples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-query ``values`` (resampling queries).
    For a paired gain, pass the per-query differences of two embeddings on the same queries."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return (float(lo), float(hi))


@dataclass(frozen=True)
class OpenSplit:
    """Whole categories held out: a model is trained on ``train`` (its categories only) and
    evaluated with the ``holdout`` images (unseen categories) as queries against every other image."""

    train: np.ndarray
    holdout: np.ndarray
    held_classes: tuple[str, ...]

    @property
    def evaluable(self) -> bool:
        return len(self.holdout) > 0


def open_set_split(labels: list[str], fraction: float = 0.3, seed: int = 0) -> OpenSplit:
    """Hold out ``round(fraction * categories)`` whole categories (at least one), chosen at random
    among those with two or more images (a query needs another image of its kind), always keeping
    at least two categories to train on; none if that is impossible."""
    counts = Counter(labels)
    classes = sorted(counts)
    candidates = [c for c in classes if counts[c] >= 2]
    n_held = min(max(1, round(fraction * len(classes))), len(classes) - 2, len(candidates))
    if n_held < 1:
        return OpenSplit(np.arange(len(labels), dtype=np.int64), np.zeros(0, np.int64), ())
    rng = np.random.default_rng(seed)
    held = tuple(sorted(rng.choice(candidates, size=n_held, replace=False).tolist()))
    mask = np.isin(np.asarray(labels), held)
    return OpenSplit(np.flatnonzero(~mask), np.flatnonzero(mask), held)


def evaluate_open_set(
    vectors: np.ndarray, labels: list[str] | np.ndarray, split: OpenSplit
) -> RetrievalResult:
    """Each held-out image queries every other image of the set (leave-one-out): new products of
    new kinds searched against an index that also holds the known ones."""
    lab = np.asarray(labels)
    v = metrics.l2_normalize(np.asarray(vectors, dtype=np.float32))
    q = v[split.holdout]
    sims = q @ v.T
    sims[np.arange(len(split.holdout)), split.holdout] = -np.inf  # not itself
    order = np.argsort(-sims, axis=1, kind="stable")[:, :-1]  # drop the query (ranked last)
    return _rank_metrics(order, lab[split.holdout], lab, Counter(lab.tolist()), leave_one_out=True)


@dataclass(frozen=True)
class Comparison:
    """Fine-tuned against pretrained on the same queries: Recall@1 of each with its interval, and
    the paired gain (per-query hit differences, bootstrapped) with its interval."""

    pretrained: RetrievalResult
    finetuned: RetrievalResult
    pretrained_ci: tuple[float, float]
    finetuned_ci: tuple[float, float]
    gain: float
    gain_ci: tuple[float, float]

    @classmethod
    def of(
        cls,
        finetuned: RetrievalResult,
        pretrained: RetrievalResult,
        samples: int = 1000,
        confidence: float = 0.95,
        seed: int = 0,
    ) -> Comparison:
        f, p = hits_at_1(finetuned), hits_at_1(pretrained)
        return cls(
            pretrained,
            finetuned,
            bootstrap_interval(p, samples, confidence, seed),
            bootstrap_interval(f, samples, confidence, seed),
            float(f.mean() - p.mean()),
            bootstrap_interval(f - p, samples, confidence, seed),
        )

    def falls_short(self, max_drop: float) -> bool:
        """Fine-tuned Recall@1 more than ``max_drop`` below pretrained's."""
        return self.finetuned.recall_at_1 < self.pretrained.recall_at_1 - max_drop - 1e-9

    def gain_summary(self) -> dict:
        return {"recall_at_1": round(self.gain, 4), "ci": [round(v, 4) for v in self.gain_ci]}


def interval_summary(result: RetrievalResult, ci: tuple[float, float]) -> dict:
    """:meth:`RetrievalResult.summary` with ``recall_at_1_ci``."""
    return {**result.summary(), "recall_at_1_ci": [round(v, 4) for v in ci]}


def decide(
    closed: Comparison,
    open_set: Comparison | None,
    promote_on: str = "closed_set",
    max_open_set_drop: float | None = 0.01,
    require_interval: bool = True,
) -> tuple[bool, str]:
    """The ``auto`` promotion rule (``training.promotion`` in the yaml):

    * the gain in Recall@1 on ``promote_on`` (``closed_set``: stratified hold-out, same categories;
      ``open_set``: whole categories held out) must have its interval above 0 (``require_interval``;
      without it, a higher point estimate, or a tie with a higher mAP@R, is enough);
    * and open-set Recall@1 may not fall below pretrained by more than ``max_open_set_drop``
      (None: not checked; also not checked when the set has no open-set split).
    """
    main = open_set if promote_on == "open_set" else closed
    label = "open-set" if promote_on == "open_set" else "closed-set"
    if main is None:
        main, label = closed, "closed-set (no open-set split possible)"
    f, p = main.finetuned, main.pretrained
    lo, hi = main.gain_ci
    what = (
        f"{label} Recall@1 {f.recall_at_1:.3f} vs pretrained {p.recall_at_1:.3f} "
        f"(gain {main.gain:+.3f}, interval [{lo:+.3f}, {hi:+.3f}], {f.queries} queries)"
    )
    if require_interval:
        if lo <= 0:
            return False, f"not promoted: {what}: the gain's interval is not above 0"
    elif not (f.recall_at_1 > p.recall_at_1 or (f.recall_at_1 == p.recall_at_1 and f.map_at_r > p.map_at_r)):
        return False, f"not promoted: {what}: fine-tuned does not beat pretrained"
    if open_set is not None and max_open_set_drop is not None:
        of, op = open_set.finetuned.recall_at_1, open_set.pretrained.recall_at_1
        if open_set.falls_short(max_open_set_drop):
            return False, (
                f"not promoted: {what}, but open-set Recall@1 {of:.3f} is more than "
                f"{max_open_set_drop:.3f} below pretrained {op:.3f}"
            )
        what += f"; open-set Recall@1 {of:.3f} vs pretrained {op:.3f}"
    return True, f"promoted: {what}"


def fold_groups(labels: np.ndarray, indices: np.ndarray, n_groups: int, seed: int) -> list[np.ndarray]:
    """``indices`` dealt into ``n_groups`` groups, each class spread evenly (deterministic)."""
    rng = np.random.default_rng(seed)
    groups: list[list[int]] = [[] for _ in range(n_groups)]
    turn = 0
    for label in sorted(set(labels[indices].tolist())):
        idx = indices[labels[indices] == label].copy()
        rng.shuffle(idx)
        for i in idx.tolist():
            groups[turn % n_groups].append(i)
            turn += 1
    return [np.array(sorted(g), dtype=np.int64) for g in groups if g]
