"""Whole-catalog duplicate groups (the ``/{domain}/duplicates/submit`` task): every live item's
nearest items from the stored vectors through each segment's own index, in batches (memory
O(N x k), no N x N matrix), candidate pairs over the lowest score the decision could flag, the
strongest verified geometrically, joined into groups (union-find) that keep their oldest item,
as imagededup's ``find_duplicates_to_remove``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from simserver import metrics
from simserver.duplicates import Decision, DuplicatesConfig
from simserver.verification import Features, features, verify


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
    inl, ncc, edge, detail = (np.zeros(len(i)) for _ in range(4))
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
            inl[o], ncc[o], edge[o], detail[o] = e.inliers, e.ncc, e.edge_ncc, e.detail_ncc
        verified = len(order)
    prob = decision.same_item(s, inl, ncc, edge, detail)
    dupe = decision.duplicate(s, inl, ncc, edge, detail)
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
