"""Learned fusion weights against a brute-force Recall@1: on a small cross-group product set whose
images confuse some products and whose titles confuse others, the weights a training learns are the
grid's best on the fit products, at least as good as the yaml's and as each modality alone."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from simserver.fusion_learning import GRID, learn_for_training, split_products, text_index
from simserver.index import Item
from simserver.metrics import l2_normalize
from simserver.text_config import TextConfig, Weights

GROUPS = ("north", "south", "west")
COLOURS = ("red", "green", "blue", "black")
THINGS = ("kettle", "teapot", "mug", "jug", "bowl")


def trigram_vectors(texts: list[str]) -> np.ndarray:
    """A plain text embedding: hashed character trigrams (the learning only needs some encoder)."""
    out = np.zeros((len(texts), 64), np.float32)
    for i, t in enumerate(texts):
        t = f"  {t.lower()}  "
        for j in range(len(t) - 2):
            out[i, int(hashlib.md5(t[j : j + 3].encode()).hexdigest(), 16) % 64] += 1
    return l2_normalize(out)


def product_set(seed: int = 0) -> tuple[list[Item], np.ndarray]:
    """20 products x 3 groups. Images: products 2k and 2k+1 look nearly alike; titles: colour and
    thing, the same for products p and p + 2 (4k..4k+3: two colours x two look-alikes), each group
    wording them its own way (case, word order, a dropped letter). Only both tell every product."""
    rng = np.random.default_rng(seed)
    items, vectors = [], []
    bases = rng.normal(size=(10, 32))
    for p in range(20):
        colour, thing = COLOURS[p % 2], THINGS[p // 4]
        own = bases[p // 2] + 0.25 * rng.normal(size=32)
        for g, group in enumerate(GROUPS):
            title = [f"{colour} {thing}", f"{thing.upper()} {colour}", f"{colour} {thing[:-1]}"][g]
            items.append(
                Item(
                    f"{group}/{p}.png",
                    thing,
                    "",
                    "image/png",
                    {"title": title, "shop": group, "sku": f"p{p}"},
                    id=f"{group}/{p}",
                )
            )
            vectors.append(own + 0.35 * rng.normal(size=32))
    return items, l2_normalize(np.asarray(vectors, np.float32))


def brute_recall(ti, weights: Weights, modalities: tuple[str, ...], products: set[str]) -> float:
    """Recall@1 by the definition of weighted fusion: over the candidates (every item of the
    other group among ``products``), each modality's scores min-max normalised, then weighted."""
    shops = [it.metadata["shop"] for it in ti.items]
    skus = [it.metadata["sku"] for it in ti.items]
    w = {"image": weights.image, "text": weights.text}
    right = total = 0
    for r in range(len(ti)):
        if skus[r] not in products:
            continue
        s = ti.row_scores(r)
        for g in GROUPS:
            if g == shops[r]:
                continue
            rows = [q for q in range(len(ti)) if shops[q] == g and skus[q] in products]
            fused = {q: 0.0 for q in rows}
            for m in modalities:
                lo, hi = min(s[m][q] for q in rows), max(s[m][q] for q in rows)
                for q in rows:
                    fused[q] += w[m] * ((s[m][q] - lo) / (hi - lo) if hi > lo else 1.0)
            best = min(rows, key=lambda q: (-fused[q], q))
            total += 1
            right += skus[best] == skus[r]
    return right / total


@pytest.fixture(scope="module")
def learned():
    items, vectors = product_set()
    cfg = TextConfig(fields=["title"], group="shop", product="sku", weights=Weights(image=1.0, text=0.1))
    out = learn_for_training(cfg, items, vectors, trigram_vectors, "cosine", 0.25, seed=0)
    return cfg, items, vectors, out


def test_learned_weights_are_the_grid_best_and_beat_each_modality(learned):
    cfg, items, vectors, out = learned
    assert out["learned"] is True and out["items"] == 60
    assert out["products"] == {"fit": 15, "holdout": 5}
    ti = text_index(items, vectors, trigram_vectors([it.metadata["title"] for it in items]), cfg, "cosine")
    weights = Weights.model_validate(out["weights"])
    skus = sorted({it.metadata["sku"] for it in items})
    fit, held = split_products(skus, dict.fromkeys(skus, 3), 0.25, 0)
    assert len(fit) == 15 and not fit & held
    got = brute_recall(ti, weights, ("image", "text"), fit)
    assert got == pytest.approx(out["fit"]["recall_at_1"], abs=1e-4)
    grid = [brute_recall(ti, Weights(image=w, text=round(1 - w, 2)), ("image", "text"), fit) for w in GRID]
    yaml = brute_recall(ti, cfg.weights, ("image", "text"), fit)
    image_only = brute_recall(ti, cfg.weights, ("image",), fit)
    text_only = brute_recall(ti, cfg.weights, ("text",), fit)
    fit_ok = [got >= max(grid) - 1e-9, got >= yaml, got >= image_only, got >= text_only]
    assert all(fit_ok), (got, grid, yaml, image_only, text_only)
    # The fixture is one where fusion matters: better than either modality alone, and than the yaml's.
    assert got > max(image_only, text_only) and got > yaml
    # The hold-out figures are the same definition on the held-out products.
    h = out["holdout"]
    assert h["fused"] == pytest.approx(brute_recall(ti, weights, ("image", "text"), held), abs=1e-4)
    assert h["image_only"] == pytest.approx(brute_recall(ti, cfg.weights, ("image",), held), abs=1e-4)
    assert h["text_only"] == pytest.approx(brute_recall(ti, cfg.weights, ("text",), held), abs=1e-4)
    assert h["queries"] == 5 * 3 * 2
    t = out["fit"]["threshold"]
    if t["right"] and t["wrong"]:
        assert t["used"] and t["threshold"] == out["match_threshold"] and t["balanced_accuracy"] > 0.5
    else:  # nothing to separate: the yaml's threshold
        assert not t["used"] and out["match_threshold"] == cfg.match_threshold


def test_ties_keep_the_yaml_weights():
    items, vectors = product_set()
    # Titles naming the product exactly: every weight with some text is perfect, the yaml's first.
    items = [
        Item(it.name, it.label, "", it.media_type, {**it.metadata, "title": it.metadata["sku"]}, id=it.id)
        for it in items
    ]
    cfg = TextConfig(fields=["title"], group="shop", product="sku", weights=Weights(image=0.3, text=0.6))
    out = learn_for_training(cfg, items, vectors, trigram_vectors, "cosine", 0.25, seed=0)
    assert out["fit"]["recall_at_1"] == 1.0 and out["weights"] == {"image": 0.3, "text": 0.6}


@pytest.mark.parametrize(
    ("cfg", "encode", "why"),
    [
        (TextConfig(fields=["title"], group="shop"), trigram_vectors, "text.product"),
        (TextConfig(fields=["title"], group="shop", product="sku"), None, "no text encoder"),
        (TextConfig(fields=["title"], group="shop", product="colour"), trigram_vectors, "at least 4"),
    ],
)
def test_nothing_to_learn_from_keeps_the_yaml(cfg, encode, why):
    items, vectors = product_set()
    out = learn_for_training(cfg, items, vectors, encode, "cosine", 0.25, seed=0)
    assert out["learned"] is False and why in out["reason"]
    assert out["weights"] == cfg.weights.model_dump() and out["match_threshold"] == cfg.match_threshold


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_scores_against_a_group_are_the_whole_catalogs_restricted(metric):
    """``rows_against`` (what the match-groups scan uses) against ``row_scores`` (every live row),
    on two segments with deleted rows."""
    from simserver.catalog import Catalog, Segment
    from simserver.hybrid import TextIndex

    items, vectors = product_set()
    text = trigram_vectors([it.metadata["title"] for it in items])
    cut = 25
    segs = [
        Segment("a", items[:cut], vectors[:cut], None, "base"),
        Segment("b", items[cut:], vectors[cut:], None, "delta"),
    ]
    alive = [np.arange(cut) % 7 != 3, np.arange(len(items) - cut) % 5 != 1]
    catalog = Catalog({"version": "v", "metric": metric, "dim": vectors.shape[1]}, segs, alive)
    cfg = TextConfig(fields=["title"], group="shop", product="sku")
    ti = TextIndex(catalog, cfg, {"a": text[:cut], "b": text[cut:]})
    shops = np.asarray([it.metadata["shop"] for it in ti.items])
    rows, against = np.flatnonzero(shops == "north"), np.flatnonzero(shops == "west")
    for r, got in zip(rows, ti.rows_against(rows, against), strict=True):
        want = ti.row_scores(int(r))
        for m in ("image", "text"):
            np.testing.assert_allclose(got[m], want[m][against], atol=1e-6)  # float32 products
