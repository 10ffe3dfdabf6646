"""Does a supplier's site sell the target product? Each site image scored once, then the site.

An image's ``score`` is what the image threshold is compared with. With ``scorer: probe`` (the
default) it is a linear probe's: a logistic regression of "target label or not" on the L2-normalised
embedding, fitted on the domain's images at training time and stored with the version, its output a
number in [0, 1]. With ``scorer: margin`` (and for versions calibrated before the probe) it is the
kNN margin. Both kNN figures are reported either way: an image's ``similarity`` is its score to
the nearest indexed image of the target label among its ``top_k`` nearest neighbours (0 if none is
among them); its ``margin`` is that minus the score of the nearest image of any other label (so an
image closer to an "other"/"random" example than to any target example has a negative margin). An
image is *similar* when its score reaches the domain's ``image_threshold``, calibrated at training
time (:mod:`simserver.calibration`, :mod:`simserver.relevance_calibration`).

A site is *relevant* when its fraction of similar images reaches the site threshold. With
``site_rule: likelihood`` (default) that threshold comes from the calibrated image-level recall
``r`` and false-positive rate ``f`` (add-half smoothed): a site whose share of target images is
``relevant_share`` shows similar images at rate ``p1 = f + relevant_share * (r - f)``, one with
``irrelevant_share`` at ``p0``; a site of n images with k similar ones is relevant when the
binomial log-likelihood ratio of p1 against p0 is >= 0, the same as ``k / n >= t`` with ``t``
between p0 and p1 whatever n. With ``site_rule: fixed`` it is ``site_threshold`` (0.25, as in the
reference notebook), also used when the image threshold is the request's own (its recall is unknown).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from simserver import metrics
from simserver.schemas import Hit, SiteBasis, SiteImage, SiteVerdict


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
    folds: int = Field(
        5,
        ge=1,
        le=20,
        description="calibration folds: fine-tuned versions score the images by heads never trained on them "
        "(the served head's hold-out + folds - 1 cross-fitted heads; 1: the served head only); the probe "
        "scores each image by one fitted without its fold (at least 2 folds)",
    )
    scorer: Literal["probe", "margin"] = Field(
        "probe",
        description="what an image's score is: probe: a linear classifier (target label vs every other) on "
        "the embedding, fitted at training; margin: nearest target score minus nearest other score",
    )
    probe_c: float = Field(
        1.0, gt=0, le=1000, description="the probe's inverse L2 regularisation (logistic regression C)"
    )
    rule: Literal["youden", "f1"] = Field(
        "youden", description="image threshold maximising Youden's J (recall - false-positive rate) or F1"
    )
    precision: float | None = Field(
        0.9, gt=0, le=1, description="per-image precision floor, applied with >= min_positives target images"
    )
    min_positives: int = Field(
        30, ge=1, description="target images needed before the precision floor applies"
    )
    site_rule: Literal["likelihood", "fixed"] = Field(
        "likelihood",
        description="likelihood: site threshold from the image-level recall; fixed: site_threshold",
    )
    relevant_share: float = Field(
        0.25, gt=0, le=1, description="a relevant site shows at least this share of target images"
    )
    irrelevant_share: float = Field(0.1, ge=0, lt=1, description="an irrelevant one at most this share")
    site_threshold: float = Field(
        0.25, ge=0, le=1, description="fraction of similar images for 'relevant' with site_rule: fixed"
    )
    default_image_threshold: float = Field(
        0.0, ge=-1, le=1, description="margin threshold when there is no target image to calibrate on"
    )

    @model_validator(mode="after")
    def _shares(self) -> RelevanceConfig:
        if self.irrelevant_share >= self.relevant_share:
            raise ValueError("irrelevant_share must be below relevant_share")
        return self


@dataclass(frozen=True)
class ImageScore:
    similarity: float  # score of the nearest target-label neighbour (0 if none among the k)
    other: float  # score of the nearest neighbour of another label (0 if none among the k)

    @property
    def margin(self) -> float:
        return self.similarity - self.other


@dataclass(frozen=True)
class Probe:
    """A linear probe on the L2-normalised embedding: ``score`` is P(target) by a logistic
    regression with balanced class weights (a ranking score in [0, 1], not a calibrated posterior)."""

    weights: np.ndarray  # [D]
    bias: float

    def score(self, vectors: np.ndarray) -> np.ndarray:
        z = metrics.l2_normalize(np.asarray(vectors, dtype=np.float32)).astype(np.float64) @ self.weights
        return 1.0 / (1.0 + np.exp(-(z + self.bias)))

    def to_json(self) -> dict[str, Any]:
        return {"weights": [round(float(w), 7) for w in self.weights], "bias": round(self.bias, 7)}

    @classmethod
    def from_json(cls, value: Any) -> Probe | None:
        """The probe of a version's calibration (None when it has none: scored by margin)."""
        if not isinstance(value, dict) or not isinstance(value.get("weights"), list):
            return None
        return cls(np.asarray(value["weights"], dtype=np.float64), float(value.get("bias", 0.0)))


def fit_probe(vectors: np.ndarray, is_target: np.ndarray, c: float) -> Probe:
    """Target vs the rest, class-balanced (a few target images among many others)."""
    from sklearn.linear_model import LogisticRegression  # import on first use: a second or so

    x = metrics.l2_normalize(np.asarray(vectors, dtype=np.float32)).astype(np.float64)
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
    model.fit(x, np.asarray(is_target, dtype=bool))
    return Probe(model.coef_[0].astype(np.float64), float(model.intercept_[0]))


def score_neighbours(labels: list[str], scores: list[float], target: str) -> ImageScore:
    """From one image's neighbours (best first): its target similarity and best other score."""
    best_target = max((s for lab, s in zip(labels, scores, strict=True) if lab == target), default=0.0)
    best_other = max((s for lab, s in zip(labels, scores, strict=True) if lab != target), default=0.0)
    return ImageScore(float(best_target), float(best_other))


def distances(metric: str, q: np.ndarray, g: np.ndarray) -> np.ndarray:
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
    dist = distances(metric, queries, gallery)
    k = min(top_k, dist.shape[1])
    top = np.argsort(dist, axis=1, kind="stable")[:, :k]
    labels = np.asarray(gallery_labels)
    out = []
    for row, idx in zip(dist, top, strict=True):
        scores = metrics.distance_to_score(metric, row[idx])
        out.append(score_neighbours(labels[idx].tolist(), scores.tolist(), target).margin)
    return np.asarray(out, dtype=np.float64)


@dataclass(frozen=True)
class SiteRule:
    """How a site's fraction of similar images becomes a verdict (see the module docstring)."""

    rule: str  # "likelihood", "fixed" (the config's site_threshold) or "request"
    threshold: float
    basis: SiteBasis | None = None  # likelihood only: what the threshold rests on

    def log_likelihood_ratio(self, similar: int, n: int) -> float | None:
        """log P(k of n similar | relevant site) / P(k of n | irrelevant site); None unless likelihood."""
        if self.basis is None:
            return None
        p1, p0 = self.basis.expected_fraction_relevant, self.basis.expected_fraction_irrelevant
        return similar * math.log(p1 / p0) + (n - similar) * math.log((1 - p1) / (1 - p0))


def site_rule(calibration: dict[str, Any] | None, config: RelevanceConfig) -> SiteRule:
    """The configured site rule with a version's calibration; ``fixed`` (``site_threshold``) when
    asked for, or when the calibration has no image-level counts (no target image, an older version)."""
    cal = calibration or {}
    counts = ("true_positives", "false_positives", "positives", "negatives")
    if config.site_rule == "fixed" or any(not isinstance(cal.get(k), int | float) for k in counts):
        return SiteRule("fixed", config.site_threshold)
    r = (cal["true_positives"] + 0.5) / (cal["positives"] + 1)
    f = (cal["false_positives"] + 0.5) / (cal["negatives"] + 1)
    if r <= f:  # the image decisions carry no evidence about the target: nothing to weigh
        return SiteRule("fixed", config.site_threshold)
    p1 = f + config.relevant_share * (r - f)
    p0 = f + config.irrelevant_share * (r - f)
    up, down = math.log(p1 / p0), math.log((1 - p0) / (1 - p1))
    basis = SiteBasis(
        positives=cal["positives"],
        negatives=cal["negatives"],
        image_recall=cal.get("recall", round(r, 4)),
        image_recall_ci95=cal.get("recall_ci95"),
        image_false_positive_rate=cal.get("false_positive_rate", round(f, 4)),
        image_false_positive_rate_ci95=cal.get("false_positive_rate_ci95"),
        relevant_share=config.relevant_share,
        irrelevant_share=config.irrelevant_share,
        expected_fraction_relevant=p1,
        expected_fraction_irrelevant=p0,
    )
    return SiteRule("likelihood", down / (up + down), basis)


def site_decision(
    margins: list[float], image_threshold: float, site_threshold: float
) -> tuple[list[bool], float, bool]:
    """(per-image similar, fraction similar, relevant)."""
    similar = [bool(m >= image_threshold) for m in margins]
    fraction = sum(similar) / len(similar) if similar else 0.0
    return similar, fraction, bool(similar) and fraction >= site_threshold


def thresholds(
    config: RelevanceConfig,
    calibration: dict | None,
    image_threshold: float | None = None,
    site_threshold: float | None = None,
) -> tuple[float, SiteRule]:
    """(image threshold, site rule): the request's, else the version's calibration with the
    config's site rule. A request's own image threshold has no calibrated recall, so the site
    threshold is then the config's fixed one (unless the request gives that too)."""
    cal = calibration or {}
    t_image = image_threshold if image_threshold is not None else cal.get("image_threshold")
    if t_image is None:
        t_image = config.default_image_threshold
    if site_threshold is not None:
        return t_image, SiteRule("request", site_threshold)
    if image_threshold is not None:
        return t_image, SiteRule("fixed", config.site_threshold)
    return t_image, site_rule(cal, config)


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
    vectors: np.ndarray | None = None,
) -> SiteVerdict:
    """The ``/relevance`` verdict from each site image's nearest indexed items (best first) and,
    for a version whose calibration holds a probe, the images' ``vectors`` (as searched)."""
    t_image, rule = thresholds(config, calibration, image_threshold, site_threshold)
    scores = [score_neighbours([h.label for h in row], [h.score for h in row], target) for row in results]
    probe = Probe.from_json((calibration or {}).get("probe"))
    if probe is not None:
        if vectors is None or len(vectors) != len(results):
            raise ValueError("a probe-calibrated version needs the site images' vectors")
        image_scores = probe.score(vectors).tolist()
    else:
        image_scores = [s.margin for s in scores]
    similar, fraction, relevant = site_decision(image_scores, t_image, rule.threshold)
    llr = rule.log_likelihood_ratio(sum(similar), len(similar))
    return SiteVerdict(
        relevant=relevant,
        fraction=round(fraction, 4),
        target=target,
        scorer="probe" if probe is not None else "margin",
        image_threshold=t_image,
        site_threshold=round(rule.threshold, 4),
        site_rule=rule.rule,
        log_likelihood_ratio=None if llr is None else round(llr, 4),
        basis=rule.basis,
        images=[
            SiteImage(
                name=name,
                similarity=round(sc.similarity, 4),
                margin=round(sc.margin, 4),
                score=round(float(score), 4),
                similar=sim,
                nearest=row[:nearest],
            )
            for name, sc, score, sim, row in zip(names, scores, image_scores, similar, results, strict=True)
        ],
    )
