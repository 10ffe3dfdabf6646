"""Geometric verification of a candidate pair: is one image an edited copy of the other?

* ``inliers``: OpenCV ORB keypoints of both images (and of the query's mirror image), ratio-tested
  one-to-one Hamming matches and a RANSAC similarity transform: a copy keeps dozens of inliers, two
  different photos under ~10 (:func:`inliers`);
* ``ncc`` / ``edge_ncc``: template matching of small grey thumbnails (and of their Sobel edges)
  over positions and sizes, which holds where keypoints fail: small, textureless or heavily
  re-compressed images (:func:`template_match`).

:func:`verify` gives both as :class:`Evidence`; :mod:`simserver.duplicates` turns them into a
calibrated decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

MIN_SCALE = 0.25  # a copy is not shrunk or enlarged more than 4x relative to the original
VERIFY_SIDE = 320  # images are resized so that their longer side is this, before ORB
THUMB_SIDE = 64  # template matching works on thumbnails this size: a copy's layout, not its texture
# Template sizes tried, as a fraction of the other image: a crop keeps 65-90% of the photo (the
# query inside the candidate); a border adds up to 15% on each side (the candidate inside the query).
CROP_SCALES = tuple(np.linspace(0.6, 1.0, 9))
BORDER_SCALES = tuple(np.linspace(0.7, 1.0, 7))
KEEP_CELLS = 6  # of a template's 3 x 3 cells, the best-matching that count (a caption may cover 3)


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
