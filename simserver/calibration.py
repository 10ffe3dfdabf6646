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
class CalibrationData:
    cfg: DomainConfig
    split: Split
    vectors: np.ndarray  # every image of the dataset, in the embedding the version serves
    labels: np.ndarray  # str [N]


class Calibrator(Protocol):
    name: str  # key in meta.json and in the train reply

    def applies(self, cfg: DomainConfig) -> bool: ...

    def calibrate(self, data: CalibrationData) -> dict[str, Any]: ...


class RelevanceCalibrator:
    """The per-image margin threshold of ``/relevance``: every image of the dataset scored
    leave-one-out against all the others, in the embedding the version serves (see
    :mod:`simserver.relevance_calibration`), and the site rule that follows from it."""

    name = "relevance"

    def applies(self, cfg: DomainConfig) -> bool:
        return bool(cfg.target_label)

    def calibrate(self, data: CalibrationData) -> dict[str, Any]:
        cfg, lab = data.cfg, data.labels
        assert cfg.target_label
        rc = cfg.relevance
        margins = loo_margins(data.vectors, lab, cfg.target_label, rc.top_k, cfg.metric)
        out = choose_threshold(margins, lab == cfg.target_label, rc)
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
