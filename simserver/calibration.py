"""The calibration step of a training: each capability that needs a per-domain decision rule
fitted on the dataset plugs in here, instead of growing :mod:`simserver.training`.

A :class:`Calibrator` sees the stratified split and the vectors, in the embedding the new
version serves, of every dataset image (hold-out images unseen by its head), and returns a
JSON-able dict stored in the version's ``meta.json`` under its ``name`` and reported in the
train reply. Supplier relevance is the first; duplicate thresholds, pair thresholds and text-fusion
weights follow the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from simserver.domain_config import DomainConfig
from simserver.evaluation import Split
from simserver.relevance import site_rule
from simserver.relevance_calibration import choose_threshold, loo_margins


@dataclass(frozen=True)
class ScoredPart:
    """Images scored in one embedding that never trained on them: their indices, every dataset
    image's vector in it (the gallery), and optionally augmented views of them (vectors + the
    image each one is a view of), scored as further queries the way site photos would be."""

    indices: np.ndarray
    vectors: np.ndarray
    view_vectors: np.ndarray | None = None
    view_owner: np.ndarray | None = None


@dataclass(frozen=True)
class CalibrationData:
    cfg: DomainConfig
    split: Split
    vectors: np.ndarray  # every image of the dataset, in the embedding the version serves
    labels: np.ndarray  # str [N]
    # None: every image scored with the served vectors (an embedding that trained on none of them).
    parts: list[ScoredPart] | None = None


class Calibrator(Protocol):
    name: str  # key in meta.json and in the train reply

    def applies(self, cfg: DomainConfig) -> bool: ...

    def calibrate(self, data: CalibrationData) -> dict[str, Any]: ...


class RelevanceCalibrator:
    """The per-image margin threshold of ``/relevance``: every image of the dataset scored
    leave-one-out against all the others (see :mod:`simserver.relevance_calibration`), in an
    embedding whose head never trained on it (the served one's hold-out, the others by heads
    cross-fitted without them), and the site rule that follows from it."""

    name = "relevance"

    def applies(self, cfg: DomainConfig) -> bool:
        return bool(cfg.target_label)

    def calibrate(self, data: CalibrationData) -> dict[str, Any]:
        cfg, lab = data.cfg, data.labels
        assert cfg.target_label
        rc = cfg.relevance
        parts = data.parts or [ScoredPart(np.arange(len(lab)), data.vectors)]
        margins, owners = [], []
        for part in parts:
            margins.append(
                loo_margins(part.vectors, lab, cfg.target_label, rc.top_k, cfg.metric, queries=part.indices)
            )
            owners.append(part.indices)
            if part.view_vectors is not None and part.view_owner is not None and len(part.view_owner):
                margins.append(
                    loo_margins(
                        part.vectors,
                        lab,
                        cfg.target_label,
                        rc.top_k,
                        cfg.metric,
                        queries=part.view_owner,
                        query_vectors=part.view_vectors,
                    )
                )
                owners.append(part.view_owner)
        owner = np.concatenate(owners).astype(np.int64)
        out = choose_threshold(np.concatenate(margins), lab[owner] == cfg.target_label, rc, images=owner)
        views = sum(len(p.view_owner) for p in parts if p.view_owner is not None)
        out["method"] = "leave-one-out" + (f", {len(parts)} cross-fitted heads" if len(parts) > 1 else "")
        out["augmented_views"] = views
        rule = site_rule(out, rc)
        site = {"site_rule": rule.rule, "site_threshold": round(rule.threshold, 4)}
        if rule.basis is not None:
            site["expected_fraction_relevant"] = round(rule.basis.expected_fraction_relevant, 4)
            site["expected_fraction_irrelevant"] = round(rule.basis.expected_fraction_irrelevant, 4)
        return {"target": cfg.target_label, "top_k": rc.top_k, **out, **site}


class PairCalibrator:
    """``POST /similarity`` with a ``domain``: the distance under which two images are judged to
    show the same label, fitted on hold-out x training pairs (as a Siamese network is judged):
    the threshold maximising balanced accuracy, with the pairs' ROC AUC and accuracy there."""

    name = "pair"
    max_pairs = 200_000

    def applies(self, cfg: DomainConfig) -> bool:
        return True

    def calibrate(self, data: CalibrationData) -> dict[str, Any]:
        from simserver import metrics

        split, lab = data.split, data.labels
        if not split.evaluable:
            return {"threshold": None, "reason": "no hold-out: every category has one image"}
        q, g = data.vectors[split.holdout], data.vectors[split.train]
        if len(q) * len(g) > self.max_pairs:  # a deterministic sample of hold-out queries
            keep = np.random.default_rng(0).choice(len(q), self.max_pairs // len(g) or 1, replace=False)
            q, ql = q[keep], lab[split.holdout][keep]
        else:
            ql = lab[split.holdout]
        d = pair_distances(data.cfg.metric, q, g).ravel()
        same = (ql[:, None] == lab[split.train][None, :]).ravel()
        if same.all() or not same.any():
            return {"threshold": None, "reason": "the hold-out pairs are all of one kind"}
        order = np.argsort(d, kind="stable")
        ds, ss = d[order], same[order]
        tp = np.cumsum(ss)  # predicted "same" = the first i+1 pairs by distance
        fp = np.cumsum(~ss)
        pos, neg = int(ss.sum()), int((~ss).sum())
        balanced = 0.5 * (tp / pos + (neg - fp) / neg)
        best = int(np.argmax(balanced))
        threshold = float(ds[best])
        predicted = d <= threshold
        # ROC AUC = P(distance of a same-label pair < that of a different-label pair), ties half.
        ranks = np.empty(len(d))
        ranks[order] = np.arange(1, len(d) + 1)
        auc = 1.0 - (ranks[same].sum() - pos * (pos + 1) / 2) / (pos * neg)
        return {
            "threshold": round(threshold, 6),
            "metric": data.cfg.metric,
            "roc_auc": round(float(auc), 4),
            "accuracy": round(float((predicted == same).mean()), 4),
            "balanced_accuracy": round(float(balanced[best]), 4),
            "pairs": len(d),
            "same_label_pairs": pos,
            "score_threshold": round(float(metrics.distance_to_score(data.cfg.metric, threshold)), 6),
        }


def pair_distances(metric: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] distances in ``metric`` (as :func:`simserver.metrics.pairwise_distance`)."""
    from simserver import metrics

    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if metric == "cosine":
        an, bn = metrics.l2_normalize(a64).astype(np.float64), metrics.l2_normalize(b64).astype(np.float64)
        return 1.0 - an @ bn.T
    if metric == "ip":
        return 1.0 - a64 @ b64.T
    if metric == "l2":
        sq = (a64**2).sum(1)[:, None] + (b64**2).sum(1)[None, :] - 2 * a64 @ b64.T
        return np.sqrt(np.maximum(sq, 0.0))
    return np.stack([np.abs(b64 - row).sum(1) for row in a64]) if len(a64) else np.zeros((0, len(b64)))


CALIBRATORS: tuple[Calibrator, ...] = (RelevanceCalibrator(), PairCalibrator())


def calibrate_all(
    data: CalibrationData, calibrators: tuple[Calibrator, ...] = CALIBRATORS
) -> dict[str, dict[str, Any]]:
    """Every calibration that applies to the domain, by name."""
    return {c.name: c.calibrate(data) for c in calibrators if c.applies(data.cfg)}
