"""Does a supplier's site sell the target product? kNN scoring of each site image, once.

An image's ``similarity`` is its score to the nearest indexed image of the target label among its
``top_k`` nearest neighbours (0 if none is among them); its ``margin`` is that minus the score of the
nearest image of any other label (so an image closer to an "other"/"random" example than to any
target example has a negative margin). An image is *similar* when its margin reaches the domain's
``image_threshold``, calibrated at training time (:func:`calibrate`); a site is *relevant* when the
fraction of similar images reaches ``site_threshold`` (default 0.25, as in the reference notebook).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from simserver import metrics
from simserver.schemas import Hit, SiteImage, SiteVerdict


class RelevanceConfig(BaseModel):
    """``relevance:`` in ``domains/<name>.yaml`` (used when ``target_label`` is set)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    top_k: int = Field(
        20,
        ge=1,
        le=1000,
        validation_alias=AliasChoices("top_k", "k"),  # `k` before the names were unified
        description="neighbours looked at per site image",
    )
    precision: float = Field(
        0.9, gt=0, le=1, description="per-image precision the calibrated image_threshold aims for"
    )
    site_threshold: float = Field(0.25, ge=0, le=1, description="fraction of similar images for 'relevant'")
    default_image_threshold: float = Field(
        0.0, ge=-1, le=1, description="margin threshold when the hold-out has no target image to calibrate on"
    )


@dataclass(frozen=True)
class ImageScore:
    similarity: float  # score of the nearest target-label neighbour (0 if none among the k)
    other: float  # score of the nearest neighbour of another label (0 if none among the k)

    @property
    def margin(self) -> float:
        return self.similarity - self.other


def score_neighbours(labels: list[str], scores: list[float], target: str) -> ImageScore:
    """From one image's neighbours (best first): its target similarity and best other score."""
    best_target = max((s for lab, s in zip(labels, scores, strict=True) if lab == target), default=0.0)
    best_other = max((s for lab, s in zip(labels, scores, strict=True) if lab != target), default=0.0)
    return ImageScore(float(best_target), float(best_other))


def _distances(metric: str, q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """[Q, G] distances as the domain's index measures them (see simserver.metrics)."""
    q = np.asarray(q, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    if metric == "cosine":
        return np.maximum(1.0 - metrics.l2_normalize(q).astype(np.float64) @ metrics.l2_normalize(g).T, 0.0)
    if metric == "ip":
        return 1.0 - q @ g.T
    if metric == "l2":
        sq = (q**2).sum(1)[:, None] + (g**2).sum(1)[None, :] - 2 * q @ g.T
        return np.sqrt(np.maximum(sq, 0.0))
    if metric == "l1":  # one query at a time: a [Q, G, D] array would not fit for large sets
        return np.stack([np.abs(g - row).sum(-1) for row in q]) if len(q) else np.zeros((0, len(g)))
    raise ValueError(f"unknown metric {metric!r}")


def margins_exact(
    queries: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: list[str],
    target: str,
    top_k: int,
    metric: str = "cosine",
) -> np.ndarray:
    """Margins of ``queries`` against a gallery by exact kNN (calibration, benchmarks): the same
    scores a search of the domain's index gives."""
    dist = _distances(metric, queries, gallery)
    k = min(top_k, dist.shape[1])
    top = np.argsort(dist, axis=1, kind="stable")[:, :k]
    labels = np.asarray(gallery_labels)
    out = []
    for row, idx in zip(dist, top, strict=True):
        scores = metrics.distance_to_score(metric, row[idx])
        out.append(score_neighbours(labels[idx].tolist(), scores.tolist(), target).margin)
    return np.asarray(out, dtype=np.float64)


def calibrate(margins: np.ndarray, is_target: np.ndarray, precision: float, default: float) -> dict:
    """A margin threshold from labelled margins: the lowest target margin whose precision reaches
    ``precision`` (so the most target images are still found; if none reaches it, the most precise
    one), then moved midway down to the next lower margin."""
    margins = np.asarray(margins, dtype=np.float64)
    is_target = np.asarray(is_target, dtype=bool)
    pos, neg = int(is_target.sum()), int((~is_target).sum())
    base = {"precision_target": precision, "positives": pos, "negatives": neg}
    if pos == 0:
        return {**base, "image_threshold": default, "precision": None, "recall": None, "method": "default"}
    best = None
    for t in np.unique(margins[is_target]):
        chosen = margins >= t
        tp = int((chosen & is_target).sum())
        fp = int((chosen & ~is_target).sum())
        prec, rec = tp / (tp + fp), tp / pos
        key = (prec >= precision, rec if prec >= precision else prec, rec)
        if best is None or key > best[0]:
            best = (key, float(t), prec, rec)
    assert best is not None
    _, t, prec, rec = best
    # Midway to the next lower margin (always a non-target one): the same decisions on this data,
    # but unseen target images scoring a little below the lowest calibration one still count.
    # With a handful of target images, a threshold *at* one of them would overfit.
    below = margins[margins < t]
    threshold = (t + float(below.max())) / 2 if below.size else t
    return {
        **base,
        "image_threshold": round(threshold, 6),
        "precision": round(prec, 4),
        "recall": round(rec, 4),
        "method": "hold-out",
    }


def site_decision(
    margins: list[float], image_threshold: float, site_threshold: float
) -> tuple[list[bool], float, bool]:
    """(per-image similar, fraction similar, relevant)."""
    similar = [m >= image_threshold for m in margins]
    fraction = sum(similar) / len(similar) if similar else 0.0
    return similar, fraction, bool(similar) and fraction >= site_threshold


def judge_site(
    names: list[str],
    results: list[list[Hit]],
    target: str,
    config: RelevanceConfig,
    *,
    calibration: dict | None = None,
    image_threshold: float | None = None,
    site_threshold: float | None = None,
    nearest: int = 3,
) -> SiteVerdict:
    """The ``/relevance`` verdict from each site image's nearest indexed items (best first).
    Thresholds: the request's, else the version's calibrated one / the config's."""
    t_image = image_threshold
    if t_image is None:
        t_image = (calibration or {}).get("image_threshold", config.default_image_threshold)
    t_site = site_threshold if site_threshold is not None else config.site_threshold
    scores = [score_neighbours([h.label for h in row], [h.score for h in row], target) for row in results]
    similar, fraction, relevant = site_decision([s.margin for s in scores], t_image, t_site)
    return SiteVerdict(
        relevant=relevant,
        fraction=round(fraction, 4),
        target=target,
        image_threshold=t_image,
        site_threshold=t_site,
        images=[
            SiteImage(
                name=name,
                similarity=round(sc.similarity, 4),
                margin=round(sc.margin, 4),
                similar=sim,
                nearest=row[:nearest],
            )
            for name, sc, sim, row in zip(names, scores, similar, results, strict=True)
        ],
    )
