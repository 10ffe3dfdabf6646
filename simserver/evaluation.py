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
    relevant = gl[order] == ql[:, None]  # [Q, G] in rank order
    hits_any = np.cumsum(relevant, axis=1) > 0
    kmax = min(max(CURVE_KS), relevant.shape[1])
    curve = [float(hits_any[:, min(k, kmax) - 1].mean()) for k in CURVE_KS]
    counts = Counter(gl.tolist())
    aps = []
    for row, label in zip(relevant, ql, strict=True):
        r = counts.get(label, 0)
        if r == 0:
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
        queries=len(q),
        top5=order[:, :5],
        first_correct=first,
    )


def is_better(finetuned: RetrievalResult, pretrained: RetrievalResult) -> tuple[bool, str]:
    """``auto`` promotion rule: strictly higher Recall@1, or equal Recall@1 and higher mAP@R."""
    f, p = finetuned, pretrained
    if f.recall_at_1 > p.recall_at_1:
        return (
            True,
            f"fine-tuned Recall@1 {f.recall_at_1:.3f} > pretrained {p.recall_at_1:.3f} on the hold-out",
        )
    if f.recall_at_1 == p.recall_at_1 and f.map_at_r > p.map_at_r:
        return True, (
            f"Recall@1 tied at {f.recall_at_1:.3f}; "
            f"fine-tuned mAP@R {f.map_at_r:.3f} > pretrained {p.map_at_r:.3f}"
        )
    return False, (
        f"fine-tuned (Recall@1 {f.recall_at_1:.3f}, mAP@R {f.map_at_r:.3f}) does not beat pretrained "
        f"(Recall@1 {p.recall_at_1:.3f}, mAP@R {p.map_at_r:.3f}) on the hold-out"
    )
