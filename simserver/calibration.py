"""The calibration step of a training: each capability that needs a per-domain decision rule
fitted on the hold-out plugs in here, instead of growing :mod:`simserver.training`.

A :class:`Calibrator` sees the stratified split and the vectors of the embedding the new version
serves (hold-out images unseen by its head), and returns a JSON-able dict stored in the version's
``meta.json`` under its ``name`` and reported in the train reply. Supplier relevance is the first;
duplicate thresholds, pair thresholds and text-fusion weights follow the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from simserver.domain_config import DomainConfig
from simserver.evaluation import Split
from simserver.relevance import calibrate, margins_exact


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
    """The per-image margin threshold of ``/relevance``: hold-out images scored against the
    training images, at the configured precision."""

    name = "relevance"

    def applies(self, cfg: DomainConfig) -> bool:
        return bool(cfg.target_label)

    def calibrate(self, data: CalibrationData) -> dict[str, Any]:
        cfg, split, lab = data.cfg, data.split, data.labels
        assert cfg.target_label
        rc = cfg.relevance
        if split.evaluable:
            m = margins_exact(
                data.vectors[split.holdout],
                data.vectors[split.train],
                lab[split.train].tolist(),
                cfg.target_label,
                rc.top_k,
                cfg.metric,
            )
            is_target = lab[split.holdout] == cfg.target_label
        else:
            m, is_target = np.zeros(0), np.zeros(0, dtype=bool)
        out = calibrate(m, is_target, rc.precision, rc.default_image_threshold)
        return {"target": cfg.target_label, "top_k": rc.top_k, "site_threshold": rc.site_threshold, **out}


CALIBRATORS: tuple[Calibrator, ...] = (RelevanceCalibrator(),)


def calibrate_all(
    data: CalibrationData, calibrators: tuple[Calibrator, ...] = CALIBRATORS
) -> dict[str, dict[str, Any]]:
    """Every calibration that applies to the domain, by name."""
    return {c.name: c.calibrate(data) for c in calibrators if c.applies(data.cfg)}
