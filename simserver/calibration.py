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
from simserver.evaluation import Split, fold_groups
from simserver.relevance import fit_probe, site_rule
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
    """The per-image score threshold of ``/relevance`` and the site rule that follows from it.
    Every image of the dataset is scored by what never saw it: a probe fitted without it
    (``scorer: probe``) or its kNN margin against all the others (``margin``, see
    :mod:`simserver.relevance_calibration`), in an embedding whose head never trained on it (the
    served one's hold-out, the others by heads cross-fitted without them)."""

    name = "relevance"

    def applies(self, cfg: DomainConfig) -> bool:
        return bool(cfg.target_label)

    def calibrate(self, data: CalibrationData) -> dict[str, Any]:
        cfg, lab = data.cfg, data.labels
        assert cfg.target_label
        rc = cfg.relevance
        parts = data.parts or [ScoredPart(np.arange(len(lab)), data.vectors)]
        is_target = lab == cfg.target_label
        if rc.scorer == "probe" and is_target.sum() >= 2 and (~is_target).any():
            out = self._probe(data, parts)
        else:
            out = self._margins(data, parts)
        views = sum(len(p.view_owner) for p in parts if p.view_owner is not None)
        out["augmented_views"] = views
        rule = site_rule(out, rc)
        site = {"site_rule": rule.rule, "site_threshold": round(rule.threshold, 4)}
        if rule.basis is not None:
            site["expected_fraction_relevant"] = round(rule.basis.expected_fraction_relevant, 4)
            site["expected_fraction_irrelevant"] = round(rule.basis.expected_fraction_irrelevant, 4)
        return {"target": cfg.target_label, "top_k": rc.top_k, **out, **site}

    @staticmethod
    def _margins(data: CalibrationData, parts: list[ScoredPart]) -> dict[str, Any]:
        """scorer margin: every image's kNN margin leave-one-out, in its part's embedding."""
        cfg, lab = data.cfg, data.labels
        assert cfg.target_label
        rc = cfg.relevance
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
        out["scorer"] = "margin"
        if out["method"] != "default":
            out["method"] = "leave-one-out" + (f", {len(parts)} cross-fitted heads" if len(parts) > 1 else "")
        return out

    @staticmethod
    def _probe(data: CalibrationData, parts: list[ScoredPart]) -> dict[str, Any]:
        """scorer probe: every image (and its views) scored by a probe fitted without it, in an
        embedding whose head never trained on it; the served probe is fitted on every image.

        With one part (no promoted head) its images are dealt into ``folds`` (at least 2) groups,
        each scored by a probe fitted on the others; with cross-fitted heads each part is a group,
        its probe fitted in that part's embedding on every image outside it (as the served probe
        scores a site image in the served embedding, fitted on images the served head trained on)."""
        cfg, lab = data.cfg, data.labels
        assert cfg.target_label
        rc = cfg.relevance
        is_target = lab == cfg.target_label
        if len(parts) == 1:
            groups = [(parts[0], g) for g in fold_groups(lab, parts[0].indices, max(2, rc.folds), 0)]
        else:
            groups = [(p, p.indices) for p in parts]
        scores, owners = [], []
        everyone = np.arange(len(lab))
        for part, group in groups:
            train = np.setdiff1d(everyone, group)
            if not is_target[train].any() or is_target[train].all():
                continue  # a probe needs both kinds: these images go unscored
            probe = fit_probe(part.vectors[train], is_target[train], rc.probe_c)
            scores.append(probe.score(part.vectors[group]))
            owners.append(group)
            if part.view_vectors is not None and part.view_owner is not None:
                mine = np.isin(part.view_owner, group)
                if mine.any():
                    scores.append(probe.score(part.view_vectors[mine]))
                    owners.append(part.view_owner[mine])
        owner = np.concatenate(owners).astype(np.int64)
        out = choose_threshold(np.concatenate(scores), is_target[owner], rc, images=owner)
        heads = f", {len(parts)} cross-fitted heads" if len(parts) > 1 else ""
        out["scorer"] = "probe"
        out["method"] = f"cross-fitted probe, {len(groups)} folds{heads}"
        out["probe"] = fit_probe(data.vectors, is_target, rc.probe_c).to_json()
        return out


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
