"""``simserver bench duplicates --data DIR``: copy-vs-look-alike detection on any folder of real
photos, this project's calibrated decision beside plain embedding cosine (imagededup's CNN method,
threshold 0.9) and perceptual hashes (the ``imagehash`` package: pHash, dHash).

From the folder (``<label>/<image>``): every image is a catalog item (the rest are distractors); a
sample of them are originals, each edited by every transform of
:data:`simserver.copies.TRANSFORMS` (positives: copy x original) and paired with its nearest
other items of the same label (look-alike negatives). The originals are split in two: the first
half calibrates the decision exactly as a training does, the second half measures it, so the
figures are on images the calibration never saw. The baselines are measured on the same test pairs
at their customary thresholds and at the threshold that flags 1% of the test look-alikes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image

from simserver import copies, duplicate_groups
from simserver import duplicates as dup
from simserver.bench.common import bench_environment

logger = logging.getLogger(__name__)


def _load(folder: Path, limit: int) -> tuple[list[Image.Image], list[str], list[str]]:
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    imgs, labels, names = [], [], []
    for p in paths:
        try:
            img = Image.open(p)
            img.load()
        except Exception:  # LICENSES, csv files, broken images: not photos
            continue
        rel = p.relative_to(folder).parts
        imgs.append(img.convert("RGB"))
        labels.append(rel[-2] if len(rel) > 1 else "")
        names.append("/".join(rel))
        if len(imgs) >= limit:
            break
    return imgs, labels, names


def _encoder():
    bench_environment()
    from simserver.encoder import IMAGE_SIZE, Encoder
    from simserver.preprocess import prepare

    enc = Encoder("builtin")

    def encode(images: list[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, enc.dim), np.float32)
        px = np.stack([prepare(copies.to_png(im), IMAGE_SIZE, 10**9) for im in images])
        return np.asarray(enc.encode(px), np.float32)

    return encode


def _hashes(images: list[Image.Image], kind: str) -> list:
    import imagehash

    fn = imagehash.phash if kind == "phash" else imagehash.dhash
    return [fn(im) for im in images]


def _at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float) -> float:
    """The score threshold flagging at most ``fpr`` of ``neg`` (higher score = more alike)."""
    if not len(neg):
        return float(pos.min()) if len(pos) else 0.0
    s = np.sort(neg)[::-1]
    allowed = int(np.floor(fpr * len(neg)))
    return float(s[allowed] + 1e-9) if allowed < len(s) else float(s[-1])


def _report(flag_pos: np.ndarray, flag_neg: np.ndarray, transforms: list[str], seconds: float) -> dict:
    names = np.asarray(transforms)
    recall = {
        t: round(float(flag_pos[names == t].mean()), 4) for t in copies.TRANSFORMS if (names == t).any()
    }
    return {
        "recall": recall,
        "recall_min": min(recall.values()),
        "lookalike_fpr": round(float(flag_neg.mean()), 4) if len(flag_neg) else None,
        "seconds": round(seconds, 2),
    }


def duplicates_figures(
    data: Path, originals: int = 60, look_alikes: int = 1, seed: int = 0, limit: int = 2000
) -> dict:
    import os

    t_all = time.perf_counter()
    imgs, labels, names = _load(Path(data), limit)
    if len(imgs) < 4:
        raise ValueError(f"{data}: fewer than 4 images")
    lab = np.asarray(labels)
    encode = _encoder()
    cfg = dup.DuplicatesConfig()
    t = time.perf_counter()
    vectors = np.concatenate([encode(imgs[i : i + 32]) for i in range(0, len(imgs), 32)])
    encode_catalog = time.perf_counter() - t
    rows = dup.choose_calibration_images(labels, min(originals, len(imgs)), seed)
    cal_rows, test_rows = rows[0::2], rows[1::2]
    la = dup.lookalike_rows(vectors, lab, rows, look_alikes, "cosine")
    la_of = dict(zip(rows, la, strict=True))

    def pairset(sub: list[int], seed: int) -> tuple[dup.PairSet, float]:
        t = time.perf_counter()
        ps = dup.calibration_pairs(
            [imgs[r] for r in sub],
            vectors[sub],
            [[imgs[j] for j, _ in la_of[r]] for r in sub],
            [[s for _, s in la_of[r]] for r in sub],
            encode,
            "cosine",
            seed=seed,
        )
        return ps, time.perf_counter() - t

    cal, cal_s = pairset(cal_rows, seed)
    decision = dup.fit_decision(
        cal.score,
        cal.inliers,
        cal.same,
        cfg.precision,
        cfg.min_score,
        True,
        cal.ncc,
        cal.edge_ncc,
        cal.detail_ncc,
    )
    no_detail = dup.fit_decision(
        cal.score, cal.inliers, cal.same, cfg.precision, cfg.min_score, True, cal.ncc, cal.edge_ncc
    )
    emb_only = dup.fit_decision(cal.score, cal.inliers, cal.same, cfg.precision, cfg.min_score, verify=False)
    test, test_s = pairset(test_rows, seed + 1)
    pos, neg = test.same, ~test.same
    tr = [t for t, s in zip(test.transform, test.same, strict=True) if s]
    out: dict = {
        "data": str(data),
        "images": len(imgs),
        "labels": len(set(labels)),
        "calibration_originals": len(cal_rows),
        "test_originals": len(test_rows),
        "copies": int(pos.sum()),
        "lookalike_pairs": int(neg.sum()),
        "encode_catalog_seconds": round(encode_catalog, 2),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "methods": {},
    }
    # ours: the decision calibrated on the other half; seconds = encoding + verifying the test pairs
    flag = decision.duplicate(test.score, test.inliers, test.ncc, test.edge_ncc, test.detail_ncc)
    out["methods"]["ours (embedding + ORB/RANSAC + template + detail match, calibrated)"] = {
        **_report(flag[pos], flag[neg], tr, test_s),
        "threshold": round(decision.threshold, 4),
    }
    flag = no_detail.duplicate(test.score, test.inliers, test.ncc, test.edge_ncc)
    out["methods"]["ours without detail match (embedding + ORB/RANSAC + template match)"] = {
        **_report(flag[pos], flag[neg], tr, test_s),
        "threshold": round(no_detail.threshold, 4),
    }
    orb_only = dup.fit_decision(cal.score, cal.inliers, cal.same, cfg.precision, cfg.min_score, True)
    flag = orb_only.duplicate(test.score, test.inliers)
    out["methods"]["ours without template match (embedding + ORB/RANSAC)"] = {
        **_report(flag[pos], flag[neg], tr, test_s),
        "threshold": round(orb_only.threshold, 4),
    }
    flag = emb_only.duplicate(test.score, test.inliers)
    out["methods"]["ours, embedding only (calibrated)"] = {
        **_report(flag[pos], flag[neg], tr, test_s),
        "threshold": round(emb_only.threshold, 4),
    }
    # plain cosine: imagededup's CNN method at 0.9, and at 1% look-alike FPR
    flag = test.score >= 0.9
    out["methods"]["cosine >= 0.9 (imagededup CNN)"] = _report(flag[pos], flag[neg], tr, test_s)
    th = _at_fpr(test.score[pos], test.score[neg], 0.01)
    flag = test.score >= th
    out["methods"]["cosine at 1% look-alike FPR"] = {
        **_report(flag[pos], flag[neg], tr, test_s),
        "threshold": round(th, 4),
    }
    # perceptual hashes on the same pairs (regenerated with the same seed: the same copies)
    made, owners, la_pairs = _test_images(imgs, test_rows, la_of, seed + 1)
    for kind in ("phash", "dhash"):
        t = time.perf_counter()
        hc = _hashes(made, kind)
        ho = {r: h for r, h in zip(test_rows, _hashes([imgs[r] for r in test_rows], kind), strict=True)}
        hl = _hashes([imgs[j] for _, j in la_pairs], kind)
        dpos = np.asarray([hc[i] - ho[o] for i, o in enumerate(owners)], np.float64)
        dneg = np.asarray([ho[r] - hl[i] for i, (r, _) in enumerate(la_pairs)], np.float64)
        secs = time.perf_counter() - t
        flag_p, flag_n = dpos <= 10, dneg <= 10  # imagededup's default max_distance_threshold
        out["methods"][f"{kind} distance <= 10 (imagededup default)"] = _report(flag_p, flag_n, tr, secs)
        th = _at_fpr(-dpos, -dneg, 0.01)
        out["methods"][f"{kind} at 1% look-alike FPR"] = {
            **_report(-dpos >= th, -dneg >= th, tr, secs),
            "threshold": -round(th, 2),
        }
    out["calibration_seconds"] = round(cal_s, 2)
    out["seconds"] = round(time.perf_counter() - t_all, 2)
    return out


def _test_images(imgs, rows, la_of, seed):
    """The test copies exactly as :func:`simserver.duplicates.calibration_pairs` made them."""
    rng = np.random.default_rng(seed)
    made, owners = [], []
    for r in rows:
        for t in copies.TRANSFORMS:
            made.append(copies.synthetic_copy(imgs[r], t, rng))
            owners.append(r)
    la_pairs = [(r, j) for r in rows for j, _ in la_of[r]]
    return made, owners, la_pairs


def table(result: dict) -> str:
    """One row per method: recall per transform, the minimum, look-alike FPR, seconds."""
    cols = list(copies.TRANSFORMS)
    head = f"{'method':46s} " + " ".join(f"{c[:6]:>6s}" for c in cols) + "    min  la-FPR   sec"
    lines = [
        f"{result['data']}: {result['images']} images, {result['test_originals']} test originals, "
        f"{result['copies']} copies, {result['lookalike_pairs']} look-alike pairs; "
        f"load {result['load_average']}",
        head,
    ]
    for name, m in result["methods"].items():
        r = m["recall"]
        lines.append(
            f"{name[:46]:46s} "
            + " ".join(f"{r.get(c, float('nan')):6.3f}" for c in cols)
            + f"  {m['recall_min']:5.3f}  {m['lookalike_fpr']:6.3f} {m['seconds']:5.1f}"
        )
    return "\n".join(lines)


def groups_figures(n: int, k: int = 10, planted: int = 500, seed: int = 0) -> dict:
    """The whole-catalog scan on ``n`` synthetic clustered 1280-d vectors (the index benchmark's
    generator) with ``planted`` near-copies, through the same catalog and index kind a served
    domain of that size gets: seconds, peak memory growth, and the planted pairs found."""
    import os

    import psutil

    from simserver.bench.common import clustered
    from simserver.catalog import Catalog
    from simserver.domain_config import DomainConfig
    from simserver.index import DomainIndex, Item
    from simserver.repository import new_version_id

    cfg = DomainConfig(name="bench")
    x, _ = clustered(n, 1280, seed=seed)
    rng = np.random.default_rng(seed)
    src = rng.choice(n - planted, planted, replace=False)
    x[n - planted :] = x[src] + rng.normal(0, 0.005, (planted, x.shape[1])).astype(np.float32)
    items = [
        Item(f"c/{i}", "c", f"k/{i}", "image/png", {}, f"item-{i}", f"2026-01-01T00:00:{i % 60:02d}")
        for i in range(n)
    ]
    t = time.perf_counter()
    base = DomainIndex.build(
        x, items, metric="cosine", encoder_id="bench", version=new_version_id(), policy=cfg.index
    )
    build_s = time.perf_counter() - t
    catalog = Catalog.of(base, cfg.catalog)
    del x
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    # embedding only (synthetic vectors have no images): a copy above score 0.9
    decision = dup.Decision(weights=[-45.0, 50.0, 0.0], threshold=0.5, min_score=0.9, verify=False)
    t, cpu = time.perf_counter(), time.process_time()
    found = duplicate_groups.find_groups(catalog, decision, dup.DuplicatesConfig(groups_k=k), None)
    scan_s, scan_cpu = time.perf_counter() - t, time.process_time() - cpu
    rss1 = proc.memory_info().rss
    group_of = {m: gi for gi, g in enumerate(found["groups"]) for m in [g["keep"], *g["duplicates"]]}
    found_planted = sum(
        1
        for i, s in enumerate(src)
        if group_of.get(f"item-{int(s)}", -1) == group_of.get(f"item-{n - planted + i}", -2)
    )
    return {
        "items": n,
        "k": k,
        "index_kind": base.meta.get("index_kind"),
        "index_build_seconds": round(build_s, 1),
        "scan_seconds": round(scan_s, 1),
        "scan_cpu_seconds": round(scan_cpu, 1),  # all threads: / 2 = wall seconds on 2 idle cores
        "rss_growth_mb": round((rss1 - rss0) / 2**20, 1),
        "planted_pairs": planted,
        "planted_found": found_planted,
        "groups": len(found["groups"]),
        "candidate_pairs": found["candidate_pairs"],
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
