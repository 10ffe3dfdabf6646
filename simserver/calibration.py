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


CALIBRATORS: tuple[Calibrator, ...] = (RelevanceCalibrator(),)


def calibrate_all(
    data: CalibrationData, calibrators: tuple[Calibrator, ...] = CALIBRATORS
) -> dict[str, dict[str, Any]]:
    """Every calibration that applies to the domain, by name."""
    return {c.name: c.calibrate(data) for c in calibrators if c.applies(data.cfg)}
