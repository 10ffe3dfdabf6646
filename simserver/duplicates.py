"""Duplicate-product detection: telling a copy of a listing's photo from a look-alike.

A copy (the same photo cropped, downscaled, re-compressed, colour-shifted, rotated, captioned,
padded or mirrored) and a look-alike (another product of the same kind) can both score high on a
global embedding. Three signals decide:

* ``score``: the domain's embedding similarity (what search ranks by), which finds the candidates;
* ``inliers``: geometric verification of each candidate with local features (OpenCV ORB keypoints,
  ratio-tested Hamming matches, a RANSAC similarity transform; the query's mirror image too), which
  a copy passes with dozens of inliers and a look-alike does not;
* ``ncc`` / ``edge_ncc``: template matching of small grey thumbnails (and their edges) over
  positions and sizes (:func:`template_match`), which holds where keypoints fail (small, textureless
  or heavily re-compressed images).

``same_item`` is a logistic model of (score, log1p(inliers), e(ncc), e(edge_ncc)) fitted per
domain on synthetic copies of the domain's own images (positives) and each image's nearest other
items of the same label (look-alike negatives); the decision threshold on it is the lowest
reaching the domain's target precision on those pairs (:func:`calibrate`). No labelled
duplicates are needed. What the calibration found (threshold, per-transform recall, look-alike
false-positive rate) is stored in the version's ``meta.json`` under ``duplicates``.

Plain functions, no BentoML: the index service and the trainer call them; ``simserver bench
duplicates`` measures them against perceptual hashes and a plain cosine threshold.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from simserver import metrics

logger = logging.getLogger(__name__)

TRANSFORMS = (
    "crop",
    "downscale",
    "jpeg",
    "colour",
    "rotate",
    "text",
    "border",
    "mirror",
    "combination",
)
MIN_SCALE = 0.25  # a copy is not shrunk or enlarged more than 4x relative to the original
VERIFY_SIDE = 320  # images are resized so that their longer side is this, before ORB
THUMB_SIDE = 64  # template matching works on thumbnails this size: a copy's layout, not its texture
# Template sizes tried, as a fraction of the other image: a crop keeps 65-90% of the photo (the
# query inside the candidate); a border adds up to 15% on each side (the candidate inside the query).
CROP_SCALES = tuple(np.linspace(0.6, 1.0, 9))
BORDER_SCALES = tuple(np.linspace(0.7, 1.0, 7))
KEEP_CELLS = 6  # of a template's 3 x 3 cells, the best-matching that count (a caption may cover 3)


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


# -- synthetic copies ------------------------------------------------------------------------------
def _rgb(img: Image.Image) -> Image.Image:
    return img.convert("RGB") if img.mode != "RGB" else img


def _crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    f = rng.uniform(0.65, 0.9)
    cw, ch = max(1, int(w * f)), max(1, int(h * f))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x, y, x + cw, y + ch))


def _downscale(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    f = rng.uniform(0.35, 0.6)
    w, h = img.size
    return img.resize((max(8, int(w * f)), max(8, int(h * f))), Image.Resampling.BILINEAR)


def _jpeg(img: Image.Image, rng: np.random.Generator, quality: int | None = None) -> Image.Image:
    buf = io.BytesIO()
    _rgb(img).save(buf, "JPEG", quality=quality or int(rng.integers(15, 41)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _colour(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    img = _rgb(img)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.7, 1.3))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.4))
    hsv = np.asarray(img.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.integers(-12, 13))) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def _rotate(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    angle = rng.uniform(3, 10) * rng.choice([-1, 1])
    return _rgb(img).rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=(255, 255, 255))


def _text(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    img = _rgb(img).copy()
    w, h = img.size
    draw = ImageDraw.Draw(img)
    size = max(10, h // 9)
    try:
        from PIL import ImageFont

        font = ImageFont.load_default(size=size)
    except (TypeError, OSError):  # an old Pillow without scalable default font
        font = None
    words = rng.choice(["SALE -30%", "NEW", "shop.example", "BEST PRICE", "(c) seller"])
    y = int(rng.uniform(0.05, 0.8) * h)
    draw.text((int(0.05 * w), y), str(words), fill=(255, 0, 0), font=font)
    draw.text((int(0.3 * w), int(0.9 * h) - size), "www.example.com", fill=(255, 255, 255), font=font)
    return img


def _border(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    pad = max(2, int(max(w, h) * rng.uniform(0.05, 0.15)))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    return ImageOps.expand(_rgb(img), border=pad, fill=colour)


def _mirror(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.mirror(_rgb(img))


def _combination(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return _jpeg(_text(_colour(_crop(img, rng), rng), rng), rng)


_APPLY: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "crop": _crop,
    "downscale": _downscale,
    "jpeg": _jpeg,
    "colour": _colour,
    "rotate": _rotate,
    "text": _text,
    "border": _border,
    "mirror": _mirror,
    "combination": _combination,
}


def synthetic_copy(img: Image.Image, transform: str, rng: np.random.Generator) -> Image.Image:
    """``img`` edited the way a re-listing edits a product photo (one of :data:`TRANSFORMS`)."""
    return _rgb(_APPLY[transform](_rgb(img), rng))


def to_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


# -- geometric verification ------------------------------------------------------------------------
@dataclass
class Features:
    """ORB keypoints and descriptors of an image and of its mirror image, and a small grey
    thumbnail for template matching."""

    points: tuple[np.ndarray, np.ndarray]  # [n, 2] float32 each (image, mirror)
    descriptors: tuple[np.ndarray | None, np.ndarray | None]
    thumb: np.ndarray | None = None  # float32 [h, w], longer side THUMB_SIDE


_ORB = None


def _orb():
    global _ORB
    if _ORB is None:
        import cv2

        cv2.setNumThreads(1)  # a few hundred keypoints: threads cost more than they save
        _ORB = cv2.ORB_create(nfeatures=300, fastThreshold=10, edgeThreshold=15, patchSize=15)
    return _ORB


def gray_for_verification(img: Image.Image, side: int = VERIFY_SIDE) -> np.ndarray:
    """uint8 [h, w] with the longer side ``side`` (small renders are upscaled: ORB finds few
    keypoints on a 128 px image)."""
    g = img.convert("L")
    w, h = g.size
    f = side / max(w, h)
    return np.asarray(g.resize((max(8, round(w * f)), max(8, round(h * f))), Image.Resampling.BILINEAR))


def thumbnail(img: Image.Image) -> np.ndarray:
    """float32 grey, longer side :data:`THUMB_SIDE`: what template matching compares."""
    return gray_for_verification(img, THUMB_SIDE).astype(np.float32)


def features(img: Image.Image, mirror: bool = True) -> Features:
    orb = _orb()
    g = gray_for_verification(img)
    views = [g, np.ascontiguousarray(g[:, ::-1])] if mirror else [g]
    pts, descs = [], []
    for v in views:
        kp, d = orb.detectAndCompute(v, None)
        pts.append(np.asarray([k.pt for k in kp], np.float32).reshape(-1, 2))
        descs.append(d)
    if not mirror:
        pts.append(np.zeros((0, 2), np.float32))
        descs.append(None)
    return Features((pts[0], pts[1]), (descs[0], descs[1]), thumbnail(img))


def _inliers(pa: np.ndarray, da: np.ndarray | None, pb: np.ndarray, db: np.ndarray | None) -> int:
    import cv2

    if da is None or db is None or len(da) < 2 or len(db) < 2:
        return 0
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
    good = [
        m
        for m, n in (p for p in matcher.knnMatch(da, db, k=2) if len(p) == 2)
        if m.distance < 0.8 * n.distance
    ]
    # One-to-one (the best match per candidate keypoint): many query points matched to one point
    # let RANSAC fit a degenerate, scale ~0 transform with "inliers" between unrelated photos.
    best: dict[int, Any] = {}
    for m in good:
        if m.trainIdx not in best or m.distance < best[m.trainIdx].distance:
            best[m.trainIdx] = m
    good = list(best.values())
    if len(good) < 4:
        return 0
    src = pa[[m.queryIdx for m in good]]
    dst = pb[[m.trainIdx for m in good]]
    # A similarity transform (rotation, scale, shift): what crops, resizes, rotations and borders do.
    model, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=6.0)
    if model is None or mask is None:
        return 0
    scale = float(np.hypot(model[0, 0], model[1, 0]))
    return int(mask.sum()) if MIN_SCALE < scale < 1 / MIN_SCALE else 0


def inliers(query: Features, candidate: Features) -> int:
    """RANSAC inliers between the query (or its mirror image) and a candidate's image."""
    a = _inliers(query.points[0], query.descriptors[0], candidate.points[0], candidate.descriptors[0])
    b = _inliers(query.points[1], query.descriptors[1], candidate.points[0], candidate.descriptors[0])
    return max(a, b)


def _edges(a: np.ndarray) -> np.ndarray:
    import cv2

    gx = cv2.Sobel(a, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(a, cv2.CV_32F, 0, 1, ksize=3)
    return np.sqrt(gx * gx + gy * gy)


def _cells(template: np.ndarray, window: np.ndarray) -> float:
    """Mean correlation of the :data:`KEEP_CELLS` best-matching of the 3 x 3 cells of ``template``
    with the same cells of ``window`` (same shape): a caption or a logo over up to a third of the
    image does not count, but every other part must line up."""
    h, w = template.shape
    cells = []
    for i in range(3):
        for j in range(3):
            a = template[i * h // 3 : (i + 1) * h // 3, j * w // 3 : (j + 1) * w // 3].ravel()
            b = window[i * h // 3 : (i + 1) * h // 3, j * w // 3 : (j + 1) * w // 3].ravel()
            sa, sb = float(a.std()), float(b.std())
            if sa < 1e-3 or sb < 1e-3:
                cells.append(0.0)  # a flat cell: no evidence either way
                continue
            cells.append(float(((a - a.mean()) * (b - b.mean())).mean() / (sa * sb)))
    return float(np.mean(sorted(cells)[-KEEP_CELLS:]))


def _best_match(target: np.ndarray, small: np.ndarray, scales: Sequence[float], edges: bool) -> float:
    """``small``, resized to each fraction of ``target``'s size (its own aspect kept; its edges
    then, with ``edges``, as ``target`` already is), at the position inside ``target`` where its
    normalised cross-correlation is highest; there, :func:`_cells`."""
    import cv2

    hb, wb = target.shape
    hs, ws = small.shape
    best, at = -2.0, None
    for f in scales:
        w = round(f * wb)
        h = round(w * hs / ws)
        if h > hb:
            h = round(f * hb)
            w = round(h * ws / hs)
        if w < 12 or h < 12 or w > wb or h > hb:
            continue
        t = cv2.resize(small, (w, h), interpolation=cv2.INTER_AREA)
        if edges:
            t = _edges(t)
        if float(t.std()) < 1e-3:
            continue  # a flat template correlates with nothing
        _, top, _, (x, y) = cv2.minMaxLoc(cv2.matchTemplate(target, t, cv2.TM_CCOEFF_NORMED))
        if top > best:
            best, at = top, (t, x, y)
    if at is None:
        return 0.0
    t, x, y = at
    return _cells(t, target[y : y + t.shape[0], x : x + t.shape[1]])


def template_match(query: Features, candidate: Features) -> tuple[float, float]:
    """(grey, edge) template match of the two thumbnails in [0, 1]: at the best position and size
    (the query, or its mirror image, as a part of the candidate: a crop, a downscale; or the
    candidate as a part of the query: a border), the correlation of its 3 x 3 cells, the worst
    three left out (:func:`_cells`). Correlation ignores the brightness and contrast a colour edit
    changes, and a caption covers only some cells; two different products of the same kind rarely
    line up cell by cell. The edge version (Sobel magnitude) ignores flat backgrounds, which make
    renders on white look alike."""
    if query.thumb is None or candidate.thumb is None:
        return 0.0, 0.0
    out = []
    views = (query.thumb, np.ascontiguousarray(query.thumb[:, ::-1]))
    for edges in (False, True):
        cand, quer = (
            (_edges(candidate.thumb), _edges(query.thumb)) if edges else (candidate.thumb, query.thumb)
        )
        inside = max(_best_match(cand, v, CROP_SCALES, edges) for v in views)
        around = _best_match(quer, candidate.thumb, BORDER_SCALES, edges)
        out.append(min(1.0, max(0.0, inside, around)))
    return out[0], out[1]


@dataclass(frozen=True)
class Evidence:
    """What verification found for one pair (zeros when it did not run)."""

    inliers: int = 0
    ncc: float = 0.0
    edge_ncc: float = 0.0


def verify(query: Features, candidate: Features) -> Evidence:
    ncc, edge = template_match(query, candidate)
    return Evidence(inliers(query, candidate), ncc, edge)


# -- the decision ----------------------------------------------------------------------------------
def match_evidence(ncc: np.ndarray | float) -> np.ndarray:
    """A template match as additive evidence, ``-log(1.02 - ncc)``: like ``log1p(inliers)`` it grows
    steeply where copies are (0.9 -> 2.1, 0.99 -> 3.5; a look-alike's 0.6 -> 0.9), so a near-perfect
    match can outweigh missing keypoints (measured: combination copies of 128 px renders 0.68 -> 0.75
    with it, the photos unchanged)."""
    return -np.log(1.02 - np.clip(np.asarray(ncc, np.float64), 0.0, 1.0))


class Decision(BaseModel):
    """``same_item = sigmoid(w0 + w1 * score + w2 * log1p(inliers) + w3 * e(ncc) + w4 * e(edge_ncc))``
    with ``e`` = :func:`match_evidence`; a duplicate when ``score >= min_score`` and ``same_item >=
    threshold``. Decisions fitted before template matching have three weights (no ncc terms)."""

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
    ) -> np.ndarray:
        score = np.asarray(score, np.float64)
        z = self.weights[0] + self.weights[1] * score
        if self.verify:
            z = z + self.weights[2] * np.log1p(np.asarray(inl, np.float64))
            if len(self.weights) >= 5:
                zero = np.zeros_like(score)
                z = z + self.weights[3] * match_evidence(zero if ncc is None else ncc)
                z = z + self.weights[4] * match_evidence(zero if edge_ncc is None else edge_ncc)
        return 1.0 / (1.0 + np.exp(-z))

    def lowest_possible_score(self, max_inliers: int = 1000) -> float:
        """The lowest score at which a pair could still be a duplicate (with ``max_inliers``, more
        than ORB's keypoints allow, and perfect template matches): pairs under it need no
        verification."""
        grid = np.linspace(self.min_score, 1.0, 201)
        ones = np.ones(len(grid))
        ok = self.duplicate(grid, np.full(len(grid), max_inliers), ones, ones)
        return float(grid[np.argmax(ok)]) if ok.any() else 1.0 + 1e-9

    def duplicate(
        self,
        score: np.ndarray,
        inl: np.ndarray,
        ncc: np.ndarray | None = None,
        edge_ncc: np.ndarray | None = None,
    ) -> np.ndarray:
        p = self.same_item(score, inl, ncc, edge_ncc)
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
) -> Decision:
    """The logistic model on the pairs, then its threshold (:func:`balanced_threshold`).
    ``verify``: on (score, log1p(inliers)) and, given ``ncc`` / ``edge_ncc``, the template matches;
    otherwise on the score alone."""
    score, inl, same = np.asarray(score, np.float64), np.asarray(inl, np.float64), np.asarray(same, bool)
    columns = [score]
    if verify:
        columns.append(np.log1p(inl))
        if ncc is not None and edge_ncc is not None:
            columns += [match_evidence(ncc), match_evidence(edge_ncc)]
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
    p = d.same_item(score, inl, ncc, edge_ncc)
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
    flagged = decision.duplicate(pairs.score, pairs.inliers, pairs.ncc, pairs.edge_ncc)
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
        pairs.score, pairs.inliers, pairs.same, cfg.precision, cfg.min_score, True, pairs.ncc, pairs.edge_ncc
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


# -- whole-catalog groups --------------------------------------------------------------------------
def _approximate_rows(
    seg, alive: np.ndarray, q: np.ndarray, k: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """A segment's approximate index searched for the whole batch at once (FAISS's threads, no
    per-query Python), a few extra candidates for the dead rows, re-scored exactly."""
    import faiss

    dead = len(alive) - int(alive.sum())
    raw, rows = seg.index.search(q, min(len(alive), k + min(dead, 16)))
    rows = np.where((rows >= 0) & alive[np.maximum(rows, 0)], rows, -1)
    if isinstance(faiss.downcast_index(seg.index), faiss.IndexHNSWFlat):  # its distances are exact
        return np.where(rows >= 0, metrics.faiss_to_distance(metric, raw), np.inf), rows
    cand = seg.vectors[np.maximum(rows, 0)]  # [B, k', D]
    qq = q[:, None, :]
    if metric in ("cosine", "ip"):
        d = 1.0 - (cand * qq).sum(-1)
        d = np.maximum(d, 0.0) if metric == "cosine" else d
    elif metric == "l2":
        d = np.sqrt(((cand - qq) ** 2).sum(-1))
    else:
        d = np.abs(cand - qq).sum(-1)
    return np.where(rows >= 0, d, np.inf), rows


def catalog_knn(catalog, k: int, batch: int = 1024) -> tuple[list, np.ndarray, np.ndarray]:
    """Every live item's ``k`` nearest other live items, through each segment's own index (the base's
    HNSW / IVF, exact scans of deltas), in batches of queries: memory O(N x k), no N x N matrix.
    Returns (items, neighbour positions [N, k] into items (-1: none), scores [N, k])."""
    items, vectors = catalog.live()
    n = len(items)
    if n == 0:
        return items, np.zeros((0, k), np.int64), np.zeros((0, k))
    # position of (segment, row) in catalog order, to map each segment's rows to live positions
    offsets, pos_of = 0, []
    for alive in catalog.alive:
        p = np.full(len(alive), -1, np.int64)
        live_rows = np.flatnonzero(alive)
        p[live_rows] = offsets + np.arange(len(live_rows))
        offsets += len(live_rows)
        pos_of.append(p)
    kk = min(k + 1, n)  # +1: the item itself comes back first
    nb = np.full((n, k), -1, np.int64)
    sc = np.zeros((n, k))
    q_all = vectors  # segments hold cosine vectors L2-normalised already
    from simserver.cpu import faiss_threads

    faiss_threads(batch)
    for start in range(0, n, batch):
        q = np.ascontiguousarray(q_all[start : start + batch], dtype=np.float32)
        dists, poss = [], []
        for si, (seg, alive) in enumerate(zip(catalog.segments, catalog.alive, strict=True)):
            c = int(alive.sum())
            if c == 0:
                continue
            approximate = seg.index is not None and seg.kind != "flat" and c > catalog.policy.exact_scan_max
            if approximate and c > 0.5 * len(alive):
                d, rows = _approximate_rows(seg, alive, q, kk, catalog.metric)
            else:  # exact scans (deltas, Flat, small), or a base mostly deleted: the selector path
                d, rows = catalog._search_segment(seg, alive, c, q, kk)
            dists.append(np.where(rows >= 0, d, np.inf))
            poss.append(np.where(rows >= 0, pos_of[si][np.maximum(rows, 0)], -1))
        dist, pos = np.concatenate(dists, 1), np.concatenate(poss, 1)
        me = np.arange(start, start + len(q))[:, None]
        dist = np.where(pos == me, np.inf, dist)  # the item itself
        order = np.argsort(dist, axis=1, kind="stable")[:, :k]
        d = np.take_along_axis(dist, order, 1)
        width = int(order.shape[1])
        nb[start : start + len(q), :width] = np.where(np.isfinite(d), np.take_along_axis(pos, order, 1), -1)
        sc[start : start + len(q), :width] = np.where(
            np.isfinite(d), metrics.distance_to_score(catalog.metric, np.where(np.isfinite(d), d, 0.0)), 0.0
        )
    return items, nb, sc


class _Groups:
    """Union-find over item positions."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = int(self.parent[root])
        while self.parent[a] != root:
            self.parent[a], a = root, int(self.parent[a])
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def candidate_pairs(
    nb: np.ndarray, sc: np.ndarray, min_score: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique (i < j) neighbour pairs scoring at least ``min_score``: arrays i, j, score."""
    n, k = nb.shape
    i = np.repeat(np.arange(n), k)
    j, s = nb.ravel(), sc.ravel()
    keep = (j >= 0) & (s >= min_score)
    i, j, s = i[keep], j[keep], s[keep]
    a, b = np.minimum(i, j), np.maximum(i, j)
    key = a * n + b
    _, first = np.unique(key, return_index=True)
    return a[first], b[first], s[first]


def group_pairs(
    n: int, i: np.ndarray, j: np.ndarray, prob: np.ndarray, created: Sequence[str], ids: Sequence[str]
) -> list[dict]:
    """Connected components of the duplicate pairs; each keeps its oldest item (then smallest id)."""
    uf = _Groups(n)
    for a, b in zip(i.tolist(), j.tolist(), strict=True):
        uf.union(a, b)
    best: dict[int, float] = {}
    for a, b, p in zip(i.tolist(), j.tolist(), prob.tolist(), strict=True):
        best[a] = max(best.get(a, 0.0), p)
        best[b] = max(best.get(b, 0.0), p)
    members: dict[int, list[int]] = {}
    for a in best:
        members.setdefault(uf.find(a), []).append(a)
    groups = []
    for ms in members.values():
        ms.sort(key=lambda m: (created[m] or "", ids[m]))
        keep, rest = ms[0], ms[1:]
        groups.append(
            {
                "keep": ids[keep],
                "duplicates": [ids[m] for m in rest],
                "scores": [round(best[m], 4) for m in rest],
            }
        )
    groups.sort(key=lambda g: str(g["keep"]))
    return groups


def find_groups(
    catalog,
    decision: Decision,
    cfg: DuplicatesConfig,
    load_image: Callable[[Any], Image.Image] | None,
) -> dict:
    """The whole catalog's duplicate groups (imagededup's ``find_duplicates_to_remove``):
    batched kNN on the stored vectors, candidate pairs over ``decision.min_score``, the strongest
    ``cfg.max_verified_pairs`` of them verified geometrically (``load_image``: an item's stored
    image; None: no verification, the decision's inliers taken as 0)."""
    t0 = time.perf_counter()
    items, nb, sc = catalog_knn(catalog, min(cfg.groups_k, max(1, catalog.count - 1)))
    i, j, s = candidate_pairs(nb, sc, decision.lowest_possible_score())
    inl, ncc, edge = np.zeros(len(i)), np.zeros(len(i)), np.zeros(len(i))
    verified = 0
    if decision.verify and load_image is not None and len(i):
        order = np.argsort(-s, kind="stable")[: cfg.max_verified_pairs]
        cache: dict[int, Features] = {}

        def feats(p: int) -> Features:
            if p not in cache:
                cache[p] = features(load_image(items[p]))
            return cache[p]

        for o in order.tolist():
            e = verify(feats(int(i[o])), feats(int(j[o])))
            inl[o], ncc[o], edge[o] = e.inliers, e.ncc, e.edge_ncc
        verified = len(order)
    prob = decision.same_item(s, inl, ncc, edge)
    dupe = decision.duplicate(s, inl, ncc, edge)
    if decision.verify and load_image is not None and len(i) > verified:
        dupe[np.argsort(-s, kind="stable")[verified:]] = False  # unverified pairs never count
    groups = group_pairs(
        len(items),
        i[dupe],
        j[dupe],
        prob[dupe],
        [it.created_at for it in items],
        [it.id for it in items],
    )
    return {
        "groups": groups,
        "to_remove": sorted(d for g in groups for d in g["duplicates"]),
        "items": len(items),
        "candidate_pairs": int(len(i)),
        "verified_pairs": verified,
        "seconds": round(time.perf_counter() - t0, 3),
    }


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
