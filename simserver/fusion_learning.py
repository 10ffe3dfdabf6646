"""Fusion weights and the same-product threshold, learned from items that share a product id
across groups: what ``simserver bench match`` measures and what every training of a domain with
``text.group`` and ``text.product`` stores with its version.

A query is an (item, other group) pair: "which item of that group is the same product?"; it is
answered right when the fused best match in that group has the item's product id. Recall@1 is the
share answered right. :func:`learn_weights` picks, from a grid of image/text weights, the one with
the best Recall@1 (ties keep the earlier candidate, so a training keeps the yaml's weights unless
another does strictly better); :func:`threshold` the ``match_score`` with the best balanced
accuracy between right and wrong best matches.

At a training (:func:`learn_for_training`), products (not images) are split into a fit part and a
hold-out with the training's seed and hold-out fraction, so no hold-out query has its answer's
product among the fitted ones; weights and threshold are fitted on the fit part and the hold-out
reports image-only, text-only and fused Recall@1 side by side.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from simserver.catalog import Catalog, Segment
from simserver.hybrid import TextIndex, absolute, fuse, item_text
from simserver.index import Item
from simserver.text_config import TextConfig, Weights

logger = logging.getLogger(__name__)

GRID = [round(x, 2) for x in np.linspace(0.0, 1.0, 11)]
# Learning scores every item against every other one (both modalities): items x items floats.
MAX_ITEMS = 1500
MIN_PRODUCTS = 4

Scores = list[dict[str, np.ndarray]]


def match_queries(ti: TextIndex) -> tuple[list[tuple[int, str]], np.ndarray, np.ndarray]:
    group, product = ti.cfg.group or "", ti.cfg.product or ""
    groups = np.asarray([it.metadata.get(group, "") for it in ti.items], dtype=object)
    products = np.asarray([it.metadata.get(product, "") for it in ti.items], dtype=object)
    names = sorted(set(groups))
    return [(r, g) for r in range(len(ti)) for g in names if g != groups[r]], groups, products


def all_scores(ti: TextIndex) -> Scores:
    """Both modalities' scores of every row against every row (stored vectors)."""
    return [ti.row_scores(r) for r in range(len(ti))]


def recall_at_1(
    ti: TextIndex,
    scores: Scores,
    weights: Weights,
    fusion: str,
    modalities: tuple[str, ...],
    products_in: set[str] | None = None,
) -> float:
    """Share of (item, other group) queries whose best match in that group is the same product
    (``products_in``: only queries and candidates of these products). A query whose product that
    group does not list has no right answer and is not counted."""
    queries, groups, products = match_queries(ti)
    keep = np.ones(len(ti), bool) if products_in is None else np.isin(products, list(products_in))
    listed = set(zip(products.tolist(), groups.tolist(), strict=True))
    right = total = 0
    for r, g in queries:
        if not keep[r] or (products[r], g) not in listed:
            continue
        s = {m: scores[r][m] for m in modalities}
        found = fuse(s, 1, (groups == g) & keep, weights, fusion, ti.cfg.candidates, exclude=r)
        total += 1
        right += bool(found) and products[found[0].row] == products[r]
    return right / max(total, 1)


def learn_weights(
    ti: TextIndex,
    scores: Scores,
    fusion: str,
    products_in: set[str] | None,
    grid: Sequence[float] = GRID[1:-1],
    first: Weights | None = None,
) -> tuple[Weights, float]:
    """The image weight (text = 1 - it) of ``grid`` with the best Recall@1 on ``products_in``'s
    queries; ``first`` is tried before the grid, so it wins ties."""
    candidates = ([first] if first is not None else []) + [
        Weights(image=w, text=round(1 - w, 2)) for w in grid
    ]
    best = (candidates[0], -1.0)
    for weights in candidates:
        r = recall_at_1(ti, scores, weights, fusion, ("image", "text"), products_in)
        if r > best[1]:
            best = (weights, r)
    return best


def threshold(
    ti: TextIndex,
    scores: Scores,
    weights: Weights,
    fusion: str = "weighted",
    products_in: set[str] | None = None,
) -> dict:
    """The ``match_threshold`` that best tells a right best-match from a wrong one: over every
    query's fused best match, the weighted absolute score (``/match``'s ``match_score``) with the
    best balanced accuracy."""
    queries, groups, products = match_queries(ti)
    keep = np.ones(len(ti), bool) if products_in is None else np.isin(products, list(products_in))
    values, right = [], []
    for r, g in queries:
        if not keep[r]:
            continue
        found = fuse(scores[r], 1, (groups == g) & keep, weights, fusion, ti.cfg.candidates, exclude=r)
        if found:
            values.append(absolute(found[0].scores, weights))
            right.append(products[found[0].row] == products[r])
    v, ok = np.asarray(values, dtype=np.float64), np.asarray(right, dtype=bool)
    best = (0.0, 0.5)
    for t in np.unique(np.round(v, 3)):
        tpr = float((v[ok] >= t).mean()) if ok.any() else 0.0
        tnr = float((v[~ok] < t).mean()) if (~ok).any() else 0.0
        if (tpr + tnr) / 2 > best[1]:
            best = (float(t), (tpr + tnr) / 2)
    return {
        "threshold": round(best[0], 3),
        "balanced_accuracy": round(best[1], 4),
        "right": int(ok.sum()),
        "wrong": int((~ok).sum()),
    }


def text_index(
    items: list[Item], image_vectors: np.ndarray, text_vectors: np.ndarray, cfg: TextConfig, metric: str
) -> TextIndex:
    """A :class:`TextIndex` over items held in memory (one segment, all live)."""
    seg = Segment("learn", items, image_vectors, None, "delta")
    dim = int(image_vectors.shape[1]) if image_vectors.ndim == 2 else 0
    catalog = Catalog({"version": "learn", "metric": metric, "dim": dim}, [seg], [np.ones(len(items), bool)])
    return TextIndex(catalog, cfg, {"learn": np.asarray(text_vectors, np.float32)})


def _not_learned(cfg: TextConfig, reason: str) -> dict:
    logger.info("fusion weights not learned: %s", reason)
    return {
        "learned": False,
        "reason": reason,
        "fusion": cfg.fusion,
        "weights": cfg.weights.model_dump(),
        "match_threshold": cfg.match_threshold,
    }


def split_products(
    products: list[str], sizes: dict[str, int], holdout_fraction: float, seed: int
) -> tuple[set[str], set[str]]:
    """(fit, held out): ``products`` shuffled with ``seed``, taken whole up to ``MAX_ITEMS`` items
    (``sizes``: items per product), the first ``holdout_fraction`` of them held out."""
    order = [products[i] for i in np.random.default_rng(seed).permutation(len(products))]
    chosen: list[str] = []
    n = 0
    for p in order:
        if n + sizes[p] > MAX_ITEMS and len(chosen) >= MIN_PRODUCTS:
            break
        chosen.append(p)
        n += sizes[p]
    n_hold = min(max(1, round(holdout_fraction * len(chosen))), len(chosen) - 2)
    return set(chosen[n_hold:]), set(chosen[:n_hold])


def learn_for_training(
    cfg: TextConfig,
    items: list[Item],
    image_vectors: np.ndarray,
    encode_text: Callable[[list[str]], np.ndarray] | None,
    metric: str,
    holdout_fraction: float,
    seed: int,
) -> dict:
    """The fusion weights and match threshold a version serves with, learned on the fit products
    of ``items`` (in the embedding the version serves), with the hold-out's Recall@1 per modality.
    ``learned`` is false (and the yaml's values are kept) when there is nothing to learn from."""
    t0 = time.perf_counter()
    if not cfg.group or not cfg.product:
        return _not_learned(cfg, "text.group and text.product name no columns")
    if encode_text is None:
        return _not_learned(cfg, "this training backend has no text encoder")
    groups_of: dict[str, set[str]] = {}
    for it in items:
        p, g = it.metadata.get(cfg.product, ""), it.metadata.get(cfg.group, "")
        if p and g:
            groups_of.setdefault(p, set()).add(g)
    shared = sorted(p for p, gs in groups_of.items() if len(gs) >= 2)
    if len(shared) < MIN_PRODUCTS:
        return _not_learned(
            cfg,
            f"{len(shared)} products ({cfg.product!r} column) are listed in two or more groups "
            f"({cfg.group!r} column): learning needs at least {MIN_PRODUCTS}",
        )
    rows_of: dict[str, list[int]] = {}
    for r, it in enumerate(items):
        rows_of.setdefault(it.metadata.get(cfg.product, ""), []).append(r)
    fit, held = split_products(shared, {p: len(rows_of[p]) for p in shared}, holdout_fraction, seed)
    chosen = fit | held
    rows = sorted(r for p in chosen for r in rows_of[p])
    subset = [items[r] for r in rows]
    text_vectors = encode_text([item_text(it, cfg.fields) for it in subset])
    ti = text_index(subset, np.asarray(image_vectors)[rows], text_vectors, cfg, metric)
    scores = all_scores(ti)
    weights, fit_recall = learn_weights(ti, scores, cfg.fusion, fit, GRID, first=cfg.weights)
    decision = threshold(ti, scores, weights, cfg.fusion, fit)
    # With no wrong (or no right) best match on the fit part there is nothing to separate.
    separable = decision["right"] > 0 and decision["wrong"] > 0

    def held_out(w: Weights, modalities: tuple[str, ...]) -> float:
        return round(recall_at_1(ti, scores, w, cfg.fusion, modalities, held), 4)

    out = {
        "learned": True,
        "reason": f"learned on {len(fit)} products, evaluated on {len(held)} held-out products",
        "fusion": cfg.fusion,
        "weights": weights.model_dump(),
        "match_threshold": decision["threshold"] if separable else cfg.match_threshold,
        "items": len(subset),
        "products": {"fit": len(fit), "holdout": len(held)},
        "fit": {"recall_at_1": round(fit_recall, 4), "threshold": {**decision, "used": separable}},
        "holdout": {
            "queries": sum(ti.items[r].metadata[cfg.product] in held for r, _ in match_queries(ti)[0]),
            "image_only": held_out(cfg.weights, ("image",)),
            "text_only": held_out(cfg.weights, ("text",)),
            "fused": held_out(weights, ("image", "text")),
            "fused_domain_weights": held_out(cfg.weights, ("image", "text")),
        },
        "seconds": round(time.perf_counter() - t0, 3),
    }
    logger.info("fusion weights: %s", out)
    return out
