"""Geometric verification of a candidate pair: is one image an edited copy of the other?

* ``inliers``: OpenCV ORB keypoints of both images (and of the query's mirror image), ratio-tested
  one-to-one Hamming matches and a RANSAC similarity transform: a copy keeps dozens of inliers, two
  different photos under ~10 (:func:`inliers`);
* ``ncc`` / ``edge_ncc``: template matching of small grey thumbnails (and of their Sobel edges)
  over positions and sizes, which holds where keypoints fail: small, textureless or heavily
  re-compressed images (:func:`template_match`);
* ``detail_ncc``: the two images aligned at the template match's position, refined (ECC) to the
  nearest similarity transform, then compared in fine detail: the median correlation of 8 x 8 cells
  of band-passed (difference of Gaussians) images (:func:`detail_match`). A look-alike's outline
  can line up with an original's (two boxes on white), its inside details do not.

:func:`verify` gives all of them as :class:`Evidence`; :mod:`simserver.duplicates` turns them into a
calibrated decision.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

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
FINE_SIDE = 128  # detail matching compares the aligned images at this size
DETAIL_CELLS = 8  # detail_ncc is the median correlation of DETAIL_CELLS x DETAIL_CELLS cells
# Band-pass of detail matching (difference of Gaussians, sigmas in FINE_SIDE pixels): fine enough
# for a product's inside details, coarse enough that JPEG blocks and resampling do not count. The
# sigmas grow when the smaller image is under FINE_SIDE (a 45 px downscale has no finer detail).
DETAIL_BAND = (1.0, 2.0)
FLAT = 0.3  # a cell whose band-passed standard deviation is under this in both images: no evidence


def parameters() -> dict:
    """What the signals' values depend on besides the images (part of a calibration's digest: a
    decision fitted on signals measured otherwise is fitted again)."""
    return {
        "verify_side": VERIFY_SIDE,
        "thumb_side": THUMB_SIDE,
        "keep_cells": KEEP_CELLS,
        "fine_side": FINE_SIDE,
        "detail_cells": DETAIL_CELLS,
        "detail_band": list(DETAIL_BAND),
        "flat": FLAT,
        "min_geometry": MIN_GEOMETRY,
    }


@dataclass
class Features:
    """ORB keypoints and descriptors of an image and of its mirror image, and a small grey
    thumbnail for template matching."""

    points: tuple[np.ndarray, np.ndarray]  # [n, 2] float32 each (image, mirror)
    descriptors: tuple[np.ndarray | None, np.ndarray | None]
    thumb: np.ndarray | None = None  # float32 [h, w], longer side THUMB_SIDE
    fine: np.ndarray | None = None  # uint8 [h, w], longer side FINE_SIDE (detail matching)
    side: int = 0  # the image's own longer side: how much detail it can have


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
    return Features(
        (pts[0], pts[1]),
        (descs[0], descs[1]),
        thumbnail(img),
        gray_for_verification(img, FINE_SIDE),
        max(img.size),
    )


@dataclass(frozen=True)
class Geometry:
    """What RANSAC found between the query (``mirrored``: its mirror image) and a candidate."""

    inliers: int = 0
    model: np.ndarray | None = None  # 2 x 3 similarity, query -> candidate, in VERIFY_SIDE pixels
    mirrored: bool = False


def _ransac(
    pa: np.ndarray, da: np.ndarray | None, pb: np.ndarray, db: np.ndarray | None
) -> tuple[int, np.ndarray | None]:
    import cv2

    if da is None or db is None or len(da) < 2 or len(db) < 2:
        return 0, None
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
        return 0, None
    src = pa[[m.queryIdx for m in good]]
    dst = pb[[m.trainIdx for m in good]]
    # A similarity transform (rotation, scale, shift): what crops, resizes, rotations and borders do.
    model, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=6.0)
    if model is None or mask is None:
        return 0, None
    scale = float(np.hypot(model[0, 0], model[1, 0]))
    return (int(mask.sum()), model) if MIN_SCALE < scale < 1 / MIN_SCALE else (0, None)


def geometry(query: Features, candidate: Features) -> Geometry:
    """RANSAC between the query (or its mirror image, whichever keeps more inliers) and a
    candidate's image."""
    a, ma = _ransac(query.points[0], query.descriptors[0], candidate.points[0], candidate.descriptors[0])
    b, mb = _ransac(query.points[1], query.descriptors[1], candidate.points[0], candidate.descriptors[0])
    return Geometry(b, mb, True) if b > a else Geometry(a, ma, False)


def inliers(query: Features, candidate: Features) -> int:
    """RANSAC inliers between the query (or its mirror image) and a candidate's image."""
    return geometry(query, candidate).inliers


def _edges(a: np.ndarray) -> np.ndarray:
    import cv2

    gx = cv2.Sobel(a, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(a, cv2.CV_32F, 0, 1, ksize=3)
    return np.sqrt(gx * gx + gy * gy)


def _grid(shape: tuple[int, ...], n: int) -> Iterator[tuple[slice, slice]]:
    """The n x n cells of an image of ``shape``, row by row (the last row and column take the
    remainder)."""
    h, w = shape[:2]
    for i in range(n):
        for j in range(n):
            yield slice(i * h // n, (i + 1) * h // n), slice(j * w // n, (j + 1) * w // n)


def _cells(template: np.ndarray, window: np.ndarray) -> float:
    """Mean correlation of the :data:`KEEP_CELLS` best-matching of the 3 x 3 cells of ``template``
    with the same cells of ``window`` (same shape): a caption or a logo over up to a third of the
    image does not count, but every other part must line up."""
    cells = []
    for cell in _grid(template.shape, 3):
        a, b = template[cell].ravel(), window[cell].ravel()
        sa, sb = float(a.std()), float(b.std())
        if sa < 1e-3 or sb < 1e-3:
            cells.append(0.0)  # a flat cell: no evidence either way
            continue
        cells.append(float(((a - a.mean()) * (b - b.mean())).mean() / (sa * sb)))
    return float(np.mean(sorted(cells)[-KEEP_CELLS:]))


@dataclass(frozen=True)
class Placement:
    """Where the best template match put the smaller image inside the other, in thumbnail
    pixels: ``target = scale * small + (x, y)``; ``inside``: the query (``mirrored``: its mirror
    image) inside the candidate; otherwise the candidate inside the query (a border)."""

    inside: bool
    mirrored: bool
    scale: float
    x: int
    y: int


def _best_match(
    target: np.ndarray, small: np.ndarray, scales: Sequence[float], edges: bool
) -> tuple[float, tuple[float, int, int, float] | None]:
    """``small``, resized to each fraction of ``target``'s size (its own aspect kept; its edges
    then, with ``edges``, as ``target`` already is), at the position inside ``target`` where its
    normalised cross-correlation is highest; there, :func:`_cells`, and the placement (scale,
    x, y, correlation)."""
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
        return 0.0, None
    t, x, y = at
    return _cells(t, target[y : y + t.shape[0], x : x + t.shape[1]]), (t.shape[1] / ws, x, y, best)


def template_match(query: Features, candidate: Features) -> tuple[float, float]:
    """(grey, edge) template match of the two thumbnails (see :func:`_template_match`)."""
    ncc, edge, _ = _template_match(query, candidate)
    return ncc, edge


def _template_match(query: Features, candidate: Features) -> tuple[float, float, Placement | None]:
    """(grey, edge) template match of the two thumbnails in [0, 1]: at the best position and size
    (the query, or its mirror image, as a part of the candidate: a crop, a downscale; or the
    candidate as a part of the query: a border), the correlation of its 3 x 3 cells, the worst
    three left out (:func:`_cells`). Correlation ignores the brightness and contrast a colour edit
    changes, and a caption covers only some cells; two different products of the same kind rarely
    line up cell by cell. The edge version (Sobel magnitude) ignores flat backgrounds, which make
    renders on white look alike. Also the grey match's best placement (by the whole template's
    correlation), where :func:`detail_match` starts."""
    if query.thumb is None or candidate.thumb is None:
        return 0.0, 0.0, None
    out = []
    placement: Placement | None = None
    views = (query.thumb, np.ascontiguousarray(query.thumb[:, ::-1]))
    for edges in (False, True):
        cand, quer = (
            (_edges(candidate.thumb), _edges(query.thumb)) if edges else (candidate.thumb, query.thumb)
        )
        found = [(_best_match(cand, v, CROP_SCALES, edges), True, m) for m, v in enumerate(views)]
        found.append((_best_match(quer, candidate.thumb, BORDER_SCALES, edges), False, 0))
        out.append(min(1.0, max(0.0, *(cells for (cells, _), _, _ in found))))
        if not edges:
            placed = [(at, inside, m) for (_, at), inside, m in found if at is not None]
            if placed:
                at, inside, m = max(placed, key=lambda p: p[0][3])
                placement = Placement(inside, bool(m), at[0], at[1], at[2])
    return out[0], out[1], placement


def _dog(a: np.ndarray, k: float) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(a, (0, 0), DETAIL_BAND[0] * k) - cv2.GaussianBlur(a, (0, 0), DETAIL_BAND[1] * k)


def _nearest_similarity(w: np.ndarray, width: int, height: int) -> np.ndarray:
    """The rotation + uniform scale nearest to an affine ``w`` (2 x 3), mapping the template's
    centre where ``w`` does: ECC's affine fit can shear and stretch one box-shaped product onto
    another, which no edit of a photo does."""
    a, b, c, d = (float(v) for v in (w[0, 0], w[0, 1], w[1, 0], w[1, 1]))
    s, r = (a + d) / 2, (b - c) / 2
    p = np.asarray([[s, r, 0.0], [-r, s, 0.0]])
    centre = np.asarray([width / 2, height / 2, 1.0])
    p[:, 2] = np.asarray(w, np.float64) @ centre - p @ centre
    return p.astype(np.float32)


MIN_GEOMETRY = 6  # RANSAC inliers from which its transform is a start for detail matching


def detail_match(
    query: Features, candidate: Features, at: Placement | None = None, geo: Geometry | None = None
) -> float:
    """How well the two images agree in fine detail once aligned, in [-1, 1] (0: not measured).

    Both images at :data:`FINE_SIDE` (longer side), a template (the query, or its mirror image;
    the candidate, for a border, where the template match put it inside the query) is aligned on
    the other by ECC (OpenCV's ``findTransformECC``, which ignores brightness and contrast) from up
    to three starts: where the template match put it (``at``: a crop, a border), the same frame (a
    rotation, which the template match does not search), and RANSAC's transform (``geo``, when it
    kept :data:`MIN_GEOMETRY` inliers: a rotated crop); the best-aligned is kept (if ECC fails from
    every start, the first start as it is), its affine transform projected on the nearest
    similarity (:func:`_nearest_similarity`). Then the median correlation of the
    :data:`DETAIL_CELLS` x :data:`DETAIL_CELLS` cells of the band-passed images (cells mostly
    outside the overlap, or flat in both, left out): a caption spoils only its cells, a look-alike
    that shares an outline differs inside."""
    import cv2

    if query.fine is None or candidate.fine is None or query.thumb is None or candidate.thumb is None:
        return 0.0
    fq, fc = query.fine.astype(np.float32), candidate.fine.astype(np.float32)
    fm = np.ascontiguousarray(fq[:, ::-1])

    def scaled(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # b's frame onto a's, aspect as is
        return np.asarray([[b.shape[1] / a.shape[1], 0, 0], [0, b.shape[0] / a.shape[0], 0]], np.float32)

    starts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (template, image, start warp)
    if at is not None:
        tmpl, inp = ((fm if at.mirrored else fq), fc) if at.inside else (fc, fq)
        t_thumb, i_thumb = (query.thumb, candidate.thumb) if at.inside else (candidate.thumb, query.thumb)
        # fine px per thumbnail px, per axis (sizes are rounded: a 45 x 128 image is 22 x 64 and 45 x 128)
        rtx, rty = tmpl.shape[1] / t_thumb.shape[1], tmpl.shape[0] / t_thumb.shape[0]
        rix, riy = inp.shape[1] / i_thumb.shape[1], inp.shape[0] / i_thumb.shape[0]
        placed = [[at.scale * rix / rtx, 0, at.x * rix], [0, at.scale * riy / rty, at.y * riy]]
        starts.append((tmpl, inp, np.asarray(placed, np.float32)))
    starts.append((fq, fc, scaled(fq, fc)))
    if geo is not None and geo.model is not None and geo.inliers >= MIN_GEOMETRY:
        w = np.asarray(geo.model, np.float32).copy()
        w[:, 2] *= FINE_SIDE / VERIFY_SIDE  # both views' longer sides: VERIFY_SIDE -> FINE_SIDE
        starts.append((fm if geo.mirrored else fq, fc, w))
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 1e-3)  # more: same figures, slower
    ecc = cast(Any, cv2).findTransformECC  # OpenCV's stubs reject a None mask, which it takes
    best_cc, (tmpl, inp, w) = -2.0, starts[0]
    for template, image, start in starts:
        try:
            cc, fitted = ecc(template, image, start.copy(), cv2.MOTION_AFFINE, criteria, None, 5)
        except cv2.error:  # did not converge (a flat image, a bad start)
            continue
        if cc > best_cc:
            best_cc, tmpl, inp, w = cc, template, image, fitted
    h, wd = tmpl.shape
    p = _nearest_similarity(w, wd, h)
    warped = cv2.warpAffine(inp, p, (wd, h), flags=cv2.INTER_LINEAR + cv2.WARP_INVERSE_MAP)
    mask = cv2.warpAffine(np.ones_like(inp), p, (wd, h), flags=cv2.INTER_NEAREST + cv2.WARP_INVERSE_MAP)
    mask = cv2.erode(mask, np.ones((5, 5), np.uint8))  # the overlap's edge is interpolated
    k = max(1.0, FINE_SIDE / max(1, min(query.side, candidate.side)))
    return _median_cell_correlation(_dog(tmpl, k), _dog(warped, k), mask > 0)


def _median_cell_correlation(a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> float:
    """The median correlation of ``a`` and ``b`` over :data:`DETAIL_CELLS` x :data:`DETAIL_CELLS`
    cells, leaving out cells mostly outside ``valid`` and cells flat in both (0 if none is left)."""
    corr = []
    for cell in _grid(a.shape, DETAIL_CELLS):
        inside = valid[cell]
        if inside.sum() < 0.5 * inside.size:
            continue
        x, y = a[cell][inside], b[cell][inside]
        sx, sy = float(x.std()), float(y.std())
        if sx < FLAT and sy < FLAT:
            continue
        corr.append(float(((x - x.mean()) * (y - y.mean())).mean() / (sx * sy + 1e-6)))
    return float(np.median(corr)) if corr else 0.0


@dataclass(frozen=True)
class Evidence:
    """What verification found for one pair (zeros when it did not run)."""

    inliers: int = 0
    ncc: float = 0.0
    edge_ncc: float = 0.0
    detail_ncc: float = 0.0


def verify(query: Features, candidate: Features) -> Evidence:
    ncc, edge, at = _template_match(query, candidate)
    geo = geometry(query, candidate)
    return Evidence(geo.inliers, ncc, edge, detail_match(query, candidate, at, geo))
