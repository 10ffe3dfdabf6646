"""Duplicate-product detection: telling a copy of a listing's photo from a look-alike.

A copy (the same photo cropped, downscaled, re-compressed, colour-shifted, rotated, captioned,
padded or mirrored) and a look-alike (another product of the same kind) can both score high on a
global embedding. Four signals decide:

* ``score``: the domain's embedding similarity (what search ranks by), which finds the candidates;
* ``inliers``: geometric verification of each candidate with local features (OpenCV ORB keypoints,
  ratio-tested Hamming matches, a RANSAC similarity transform; the query's mirror image too), which
  a copy passes with dozens of inliers and a look-alike does not;
* ``ncc`` / ``edge_ncc``: template matching of small grey thumbnails (and their edges) over
  positions and sizes (:func:`template_match`), which holds where keypoints fail (small, textureless
  or heavily re-compressed images);
* ``detail_ncc``: fine detail compared once the two are aligned (:func:`detail_match`), which tells
  a copy from a look-alike whose outline lines up with the original.

``same_item`` is a logistic model of (score, log1p(inliers), e(ncc), e(edge_ncc), e(detail_ncc)) fitted per
domain on synthetic copies of the domain's own images (positives) and each image's nearest other
items of the same label (look-alike negatives); the decision threshold on it is the lowest
reaching the domain's target precision on those pairs (:func:`calibrate`). No labelled
duplicates are needed. What the calibration found (threshold, per-transform recall, look-alike
false-positive rate) is stored in the version's ``meta.json`` under ``duplicates``.

The synthetic copies are :mod:`simserver.copies`, the verification :mod:`simserver.verification`,
the whole-catalog scan :mod:`simserver.duplicate_groups`; this module holds the decision and its
calibration. Plain functions, no BentoML: the index service and the trainer call them; ``simserver
bench duplicates`` measures them against perceptual hashes and a plain cosine threshold.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from simserver import metrics
from simserver.copies import TRANSFORMS, _rgb, synthetic_copy
from simserver.verification import features, verify

logger = logging.getLogger(__name__)


class DuplicatesConfig(BaseModel):
    """``duplicates:`` in a domain's yaml."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    precision: float = Field(0.99, gt=0, lt=1, description="target precision of the calibrated decision")
    calibration_images: int = Field(
        12,
        ge=1,
        le=1000,
        description="images copied at each calibration (x 9 transforms: the copies encoded); 4 left the "
        "five-weight decision unstable (measured: combination recall 0.29-0.79 on renders by draw)",
    )
    look_alikes: int = Field(
        3, ge=1, le=20, description="nearest other same-label items per image (negatives)"
    )
    candidates: int = Field(5, ge=1, le=50, description="nearest items verified per checked image")
    min_score: float = Field(
        0.5, ge=0, le=1, description="candidates under this embedding score are never duplicates"
    )
    groups_k: int = Field(10, ge=2, le=100, description="neighbours per item in the whole-catalog scan")
    max_verified_pairs: int = Field(
        2_000, ge=0, description="candidate pairs geometrically verified by one whole-catalog scan"
    )


# -- the decision ----------------------------------------------------------------------------------
# What a decision is fitted on (in its weights' order after the intercept). Part of the digest of a
# calibration's input: a version calibrated on fewer signals (an older release) is calibrated again.
SIGNALS = ("score", "inliers", "ncc", "edge_ncc", "detail_ncc")


def match_evidence(ncc: np.ndarray | float) -> np.ndarray:
    """A template match as additive evidence, ``-log(1.02 - ncc)``: like ``log1p(inliers)`` it grows
    steeply where copies are (0.9 -> 2.1, 0.99 -> 3.5; a look-alike's 0.6 -> 0.9), so a near-perfect
    match can outweigh missing keypoints (measured: combination copies of 128 px renders 0.68 -> 0.75
    with it, the photos unchanged)."""
    return -np.log(1.02 - np.clip(np.asarray(ncc, np.float64), 0.0, 1.0))


class Decision(BaseModel):
    """``same_item = sigmoid(w0 + w1 * score + w2 * log1p(inliers) + w3 * e(ncc) + w4 * e(edge_ncc)
    + w5 * e(detail_ncc))`` with ``e`` = :func:`match_evidence`; a duplicate when ``score >=
    min_score`` and ``same_item >= threshold``. Decisions fitted before template matching have three
    weights (no ncc terms), before detail matching five (no detail term)."""

    weights: list[float]
    threshold: float
    min_score: float
    verify: bool = Field(description="whether the decision uses verification (inliers, template match)")

    def same_item(
        self,
        score: np.ndarray,
        inl: np.ndarray,
        ncc: np.ndarray | None = None,
        edge_ncc: np.ndarray | None = None,
        detail_ncc: np.ndarray | None = None,
    ) -> np.ndarray:
        score = np.asarray(score, np.float64)
        z = self.weights[0] + self.weights[1] * score
        if self.verify:
            z = z + self.weights[2] * np.log1p(np.asarray(inl, np.float64))
            if len(self.weights) >= 5:
                zero = np.zeros_like(score)
                z = z + self.weights[3] * match_evidence(zero if ncc is None else ncc)
                z = z + self.weights[4] * match_evidence(zero if edge_ncc is None else edge_ncc)
            if len(self.weights) >= 6:
                z = z + self.weights[5] * match_evidence(zero if detail_ncc is None else detail_ncc)
        return 1.0 / (1.0 + np.exp(-z))

    def lowest_possible_score(self, max_inliers: int = 1000) -> float:
        """The lowest score at which a pair could still be a duplicate (with ``max_inliers``, more
        than ORB's keypoints allow, and perfect template matches): pairs under it need no
        verification."""
        grid = np.linspace(self.min_score, 1.0, 201)
        ones = np.ones(len(grid))
        ok = self.duplicate(grid, np.full(len(grid), max_inliers), ones, ones, ones)
        return float(grid[np.argmax(ok)]) if ok.any() else 1.0 + 1e-9

    def duplicate(
        self,
        score: np.ndarray,
        inl: np.ndarray,
        ncc: np.ndarray | None = None,
        edge_ncc: np.ndarray | None = None,
        detail_ncc: np.ndarray | None = None,
    ) -> np.ndarray:
        p = self.same_item(score, inl, ncc, edge_ncc, detail_ncc)
        return (np.asarray(score) >= self.min_score) & (p >= self.threshold)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, steps: int = 50) -> np.ndarray:
    """Newton's method on the L2-regularised logistic loss, classes weighted equally; ``x`` [n, d]
    without the intercept column. Returns [d + 1] weights, intercept first."""
    X = np.hstack([np.ones((len(x), 1)), np.asarray(x, np.float64)])
    y = np.asarray(y, np.float64)
    pos = max(1.0, y.sum())
    neg = max(1.0, len(y) - y.sum())
    sw = np.where(y > 0, 0.5 / pos, 0.5 / neg)
    w = np.zeros(X.shape[1])
    reg = l2 * np.eye(X.shape[1])
    reg[0, 0] = 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(X @ w, -50, 50)))
        grad = X.T @ (sw * (p - y)) + reg @ w
        hess = (X * (sw * p * (1 - p))[:, None]).T @ X + reg + 1e-9 * np.eye(X.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def balanced_threshold(p: np.ndarray, same: np.ndarray, precision: float) -> float:
    """The lowest threshold on ``p`` whose precision reaches ``precision`` were copies and
    look-alikes equally many (TPR / (TPR + FPR): the calibration set's own mix of 9 copies per
    look-alike would flatter any threshold); above every look-alike if none does."""
    pos, neg = max(1, int(same.sum())), max(1, int((~same).sum()))
    order = np.argsort(-p, kind="stable")
    ps = p[order]
    tpr = np.cumsum(same[order]) / pos
    fpr = np.cumsum(~same[order]) / neg
    ok = (tpr / np.maximum(tpr + fpr, 1e-12) >= precision) & (ps >= 0)
    ok &= np.append(ps[1:] < ps[:-1], True)  # only where the threshold can split ties
    if ok.any():
        return float(ps[np.flatnonzero(ok)[-1]])
    fp = p[~same]
    return float(min(1.0, fp.max() + 1e-6)) if len(fp) else 0.5


def fit_decision(
    score: np.ndarray,
    inl: np.ndarray,
    same: np.ndarray,
    precision: float,
    min_score: float,
    verify: bool,
    ncc: np.ndarray | None = None,
    edge_ncc: np.ndarray | None = None,
    detail_ncc: np.ndarray | None = None,
) -> Decision:
    """The logistic model on the pairs, then its threshold (:func:`balanced_threshold`).
    ``verify``: on (score, log1p(inliers)) and, given ``ncc`` / ``edge_ncc``, the template matches
    (and, given ``detail_ncc`` too, the detail match); otherwise on the score alone."""
    score, inl, same = np.asarray(score, np.float64), np.asarray(inl, np.float64), np.asarray(same, bool)
    columns = [score]
    if verify:
        columns.append(np.log1p(inl))
        if ncc is not None and edge_ncc is not None:
            columns += [match_evidence(ncc), match_evidence(edge_ncc)]
            if detail_ncc is not None:
                columns.append(match_evidence(detail_ncc))
    x = np.stack(columns, 1)
    w = np.zeros(x.shape[1] + 1)
    if same.any() and (~same).any():
        # Monotone: more of any signal never makes a copy less likely. Negative weights (a few
        # pairs where look-alikes outscore copies on one signal) are dropped and the rest refitted.
        active = list(range(x.shape[1]))
        while active:
            sub = fit_logistic(x[:, active], same)
            negative = [a for a, v in zip(active, sub[1:], strict=True) if v < 0]
            if not negative:
                w[0] = sub[0]
                for a, v in zip(active, sub[1:], strict=True):
                    w[1 + a] = v
                break
            active = [a for a in active if a not in negative]
        if not active:
            w[1] = 1.0
    else:  # one kind of pair only: the score alone, as is
        w[1] = 1.0
    weights = [float(v) for v in w] + ([0.0] if not verify else [])
    d = Decision(weights=weights, threshold=0.5, min_score=min_score, verify=verify)
    p = d.same_item(score, inl, ncc, edge_ncc, detail_ncc)
    p = np.where(score >= min_score, p, -1.0)
    threshold = balanced_threshold(p, same, precision)
    return d.model_copy(update={"threshold": threshold})


# -- calibration -----------------------------------------------------------------------------------
EncodeImages = Callable[[list[Image.Image]], np.ndarray]  # PIL images -> float32 [n, D] (served embedding)


@dataclass
class PairSet:
    """Calibration pairs: embedding scores, inlier counts, which are copies, their transform."""

    score: np.ndarray
    inliers: np.ndarray
    same: np.ndarray
    transform: list[str]  # a TRANSFORMS name, or "look-alike"
    ncc: np.ndarray | None = None  # template matches (see template_match)
    edge_ncc: np.ndarray | None = None
    detail_ncc: np.ndarray | None = None  # the detail match (see detail_match)


def calibration_pairs(
    originals: Sequence[Image.Image],
    vectors: np.ndarray,
    lookalike_images: Sequence[Sequence[Image.Image]],
    lookalike_scores: Sequence[Sequence[float]],
    encode: EncodeImages,
    metric: str,
    seed: int = 0,
    batch_size: int = 32,
) -> PairSet:
    """Each original x every transform (encoded in batches, scored against the original's stored
    vector, verified against it), and each original x its look-alikes (stored vectors' scores)."""
    rng = np.random.default_rng(seed)
    copies, owner, names = [], [], []
    for i, img in enumerate(originals):
        for t in TRANSFORMS:
            copies.append(synthetic_copy(img, t, rng))
            owner.append(i)
            names.append(t)
    chunks = [encode(copies[j : j + batch_size]) for j in range(0, len(copies), batch_size)]
    cv = np.concatenate(chunks) if chunks else np.zeros((0, vectors.shape[1]), np.float32)
    own = np.asarray(owner, np.int64)
    copy_scores = pair_scores(metric, cv, vectors[own])
    feats = [features(img, mirror=False) for img in originals]
    found = [verify(features(c), feats[o]) for c, o in zip(copies, owner, strict=True)]
    la_score = []
    for i, (imgs, scores) in enumerate(zip(lookalike_images, lookalike_scores, strict=True)):
        fi = features(originals[i])
        for img, s in zip(imgs, scores, strict=True):
            la_score.append(s)
            found.append(verify(fi, features(img, mirror=False)))
    return PairSet(
        score=np.concatenate([copy_scores, np.asarray(la_score, np.float64)]),
        inliers=np.asarray([e.inliers for e in found], np.float64),
        same=np.asarray([True] * len(copies) + [False] * len(la_score)),
        transform=names + ["look-alike"] * len(la_score),
        ncc=np.asarray([e.ncc for e in found], np.float64),
        edge_ncc=np.asarray([e.edge_ncc for e in found], np.float64),
        detail_ncc=np.asarray([e.detail_ncc for e in found], np.float64),
    )


def pair_scores(metric: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise scores in [0, 1] (1 = identical), as search reports them."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if metric == "cosine":
        a64, b64 = metrics.l2_normalize(a64).astype(np.float64), metrics.l2_normalize(b64).astype(np.float64)
        d = 1.0 - (a64 * b64).sum(1)
    elif metric == "ip":
        d = 1.0 - (a64 * b64).sum(1)
    elif metric == "l2":
        d = np.sqrt(((a64 - b64) ** 2).sum(1))
    else:
        d = np.abs(a64 - b64).sum(1)
    return np.asarray(metrics.distance_to_score(metric, d), np.float64)


def summarize(pairs: PairSet, decision: Decision) -> dict:
    """Per-transform recall and the look-alike false-positive rate of ``decision`` on ``pairs``."""
    flagged = decision.duplicate(pairs.score, pairs.inliers, pairs.ncc, pairs.edge_ncc, pairs.detail_ncc)
    names = np.asarray(pairs.transform)
    recall = {t: round(float(flagged[names == t].mean()), 4) for t in TRANSFORMS if (names == t).any()}
    la = names == "look-alike"
    return {
        "recall": recall,
        "recall_min": min(recall.values()) if recall else None,
        "lookalike_fpr": round(float(flagged[la].mean()), 4) if la.any() else None,
        "copies": int(pairs.same.sum()),
        "lookalikes": int(la.sum()),
    }


def calibrate(pairs: PairSet, cfg: DuplicatesConfig, images: int, started: float) -> dict:
    """The domain's duplicate decision and what it achieves on its calibration pairs (the JSON
    stored under ``duplicates`` in the version's meta)."""
    decision = fit_decision(
        pairs.score,
        pairs.inliers,
        pairs.same,
        cfg.precision,
        cfg.min_score,
        True,
        pairs.ncc,
        pairs.edge_ncc,
        pairs.detail_ncc,
    )
    embedding_only = fit_decision(
        pairs.score, pairs.inliers, pairs.same, cfg.precision, cfg.min_score, verify=False
    )
    return {
        "decision": decision.model_dump(),
        "precision_target": cfg.precision,
        **summarize(pairs, decision),
        "embedding_only": summarize(pairs, embedding_only),
        "images": images,
        "seconds": round(time.perf_counter() - started, 3),
    }


def choose_calibration_images(labels: Sequence[str], n: int, seed: int = 0) -> list[int]:
    """``n`` dataset rows spread over the labels (round-robin over shuffled labels), deterministic."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(lab, []).append(i)
    pools = [list(rng.permutation(v)) for _, v in sorted(by_label.items())]
    out: list[int] = []
    while len(out) < n and any(pools):
        for p in pools:
            if p and len(out) < n:
                out.append(int(p.pop()))
    return out


def lookalike_rows(
    vectors: np.ndarray, labels: np.ndarray, rows: Sequence[int], k: int, metric: str
) -> list[list[tuple[int, float]]]:
    """For each row, its ``k`` nearest *other* rows of the same label, with their scores."""
    out = []
    for r in rows:
        same = np.flatnonzero((labels == labels[r]) & (np.arange(len(labels)) != r))
        if not len(same):  # a label with one image: the nearest of any label stand in
            same = np.flatnonzero(np.arange(len(labels)) != r)
        s = pair_scores(metric, np.repeat(vectors[r : r + 1], len(same), 0), vectors[same])
        top = np.argsort(-s, kind="stable")[:k]
        out.append([(int(same[j]), float(s[j])) for j in top])
    return out


def decision_of(meta: dict) -> Decision | None:
    cal = meta.get("duplicates") or {}
    return Decision.model_validate(cal["decision"]) if cal.get("decision") else None


def default_decision(cfg: DuplicatesConfig) -> Decision:
    """Before any calibration: a copy needs a high score and some geometric support."""
    return Decision(weights=[-30.0, 20.0, 3.0], threshold=0.5, min_score=cfg.min_score, verify=True)


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# -- calibration of a dataset or a catalog ---------------------------------------------------------
MAX_CALIBRATION_SIDE = 1024  # originals are shrunk to this first: the transforms' cost stays bounded


def open_for_calibration(data: bytes) -> Image.Image:
    opened = Image.open(io.BytesIO(data))
    img: Image.Image = _rgb(ImageOps.exif_transpose(opened) or opened)
    if max(img.size) > MAX_CALIBRATION_SIDE:
        img.thumbnail((MAX_CALIBRATION_SIDE, MAX_CALIBRATION_SIDE), Image.Resampling.BILINEAR)
    return img


def pixels_of(images: Sequence[Image.Image], size: int) -> np.ndarray:
    """uint8 [n, size, size, 3], as :func:`simserver.preprocess.prepare` gives the encoder."""
    from simserver.preprocess import square, to_rgb

    return np.stack([np.asarray(square(to_rgb(im), size), np.uint8) for im in images])


def calibrate_rows(
    cfg: DuplicatesConfig,
    image_of: Callable[[int], bytes],
    vectors: np.ndarray,
    labels: np.ndarray,
    encode_pixels: Callable[[np.ndarray], np.ndarray],
    metric: str,
    image_size: int,
    batch_size: int = 32,
) -> dict:
    """:func:`calibrate` on ``cfg.calibration_images`` rows of a dataset or catalog (spread over
    its labels), ``image_of(row)`` giving a row's image bytes and ``encode_pixels`` the served
    embedding of pixels."""
    if len(labels) < 2:
        return {"decision": None, "reason": "fewer than 2 items: no look-alike to calibrate against"}
    rows = choose_calibration_images(list(labels), cfg.calibration_images)
    la = lookalike_rows(vectors, labels, rows, cfg.look_alikes, metric)
    opened: dict[int, Image.Image] = {}

    def img(r: int) -> Image.Image:
        if r not in opened:
            opened[r] = open_for_calibration(image_of(r))
        return opened[r]

    t0 = time.perf_counter()
    pairs = calibration_pairs(
        [img(r) for r in rows],
        vectors[rows],
        [[img(j) for j, _ in pairs] for pairs in la],
        [[s for _, s in pairs] for pairs in la],
        lambda ims: np.asarray(encode_pixels(pixels_of(ims, image_size)), np.float32),
        metric,
        batch_size=batch_size,
    )
    return calibrate(pairs, cfg, len(rows), t0)
