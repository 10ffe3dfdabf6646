"""``simserver bench match``: product matching across shops, image-only vs text-only vs fused.

The set (:mod:`simserver.bench.match_set`): 130 products x 3 shops, each shop with its own drawing
of the product and its own wording of the title. For every item of every shop and every other
shop, the query is "which item of that shop is the same product?", answered from the item's image
alone, its title alone, or both fused (the same :class:`simserver.hybrid.TextIndex` the server
uses); Recall@1 is the share answered right. The fusion weights are also *learned*: a grid search
on half the products, scored on the other half (and the other way round), as a training would.

Then, with ``--http``, the latency of text-only and hybrid ``/food/search`` over HTTP at 1 and 4
clients, on a real server with the food demo domain (titles and shops configured).
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from simserver.bench.match_set import FOOD, metadata_rows
from simserver.fusion_learning import (
    all_scores,
    learn_weights,
    match_queries,
    recall_at_1,
    text_index,
    threshold,
)
from simserver.hybrid import TextIndex
from simserver.index import Item
from simserver.text_config import TextConfig, Weights

logger = logging.getLogger(__name__)


def build_set(folder: Path = FOOD) -> tuple[TextIndex, dict]:
    """The product set as one catalog with image and text vectors (built-in encoders)."""
    from simserver.builder import decode_batch
    from simserver.domain_config import Limits
    from simserver.encoder import Encoder
    from simserver.ingest import read_folder
    from simserver.text_encoder import TextEncoder

    t0 = time.perf_counter()
    ds = read_folder(folder, Limits())
    by_name = {r["filename"]: r for r in metadata_rows(folder)}
    samples = [s for s in ds.samples if s.name in by_name]
    images = Encoder("builtin")
    vectors = np.concatenate(
        [images.encode(decode_batch(samples[i : i + 32])) for i in range(0, len(samples), 32)]
    )
    items = [
        Item(s.name, s.label, "", s.media_type, {k: by_name[s.name][k] for k in ("title", "shop", "product")})
        for s in samples
    ]
    t_img = time.perf_counter() - t0
    text = TextEncoder("builtin")
    cfg = TextConfig(fields=["title"], group="shop", product="product")
    t1 = time.perf_counter()
    tv = text.encode([it.metadata["title"] for it in items])
    t_txt = time.perf_counter() - t1
    info = {
        "items": len(items),
        "products": len({it.metadata["product"] for it in items}),
        "shops": sorted({it.metadata["shop"] for it in items}),
        "image_encode_s": round(t_img, 2),
        "text_encode_s": round(t_txt, 2),
        "text_ms_per_title": round(1000 * t_txt / len(items), 2),
    }
    return text_index(items, vectors, tv, cfg, "cosine"), info


def quality(ti: TextIndex) -> dict:
    scores = all_scores(ti)
    default = Weights()
    out: dict = {
        "queries": len(match_queries(ti)[0]),
        "image_only": recall_at_1(ti, scores, default, "weighted", ("image",)),
        "text_only": recall_at_1(ti, scores, default, "weighted", ("text",)),
        "fused_weighted": recall_at_1(ti, scores, default, "weighted", ("image", "text")),
        "fused_rrf": recall_at_1(ti, scores, default, "rrf", ("image", "text")),
    }
    # Text alone split into its parts: the encoder's cosine and the TF-IDF's.
    for name, lexical in (("text_encoder_only", 0.0), ("text_tfidf_only", 1.0)):
        part = TextIndex.__new__(TextIndex)
        part.__dict__.update(ti.__dict__)
        part.cfg = ti.cfg.model_copy(update={"lexical": lexical})
        s = [{"text": part.text_scores(part.text_vectors[r], part.texts[r])} for r in range(len(ti))]
        out[name] = recall_at_1(part, s, default, "weighted", ("text",))
    # Learned weights, two-fold over products: fit on one half, score on the other.
    products = sorted({it.metadata["product"] for it in ti.items})
    halves = [set(products[0::2]), set(products[1::2])]
    folds: list[dict] = []
    for fit, held in ((halves[0], halves[1]), (halves[1], halves[0])):
        w, fit_r = learn_weights(ti, scores, "weighted", fit)
        folds.append(
            {
                "weights": w.model_dump(),
                "fit_recall_at_1": round(fit_r, 4),
                "held_out_recall_at_1": round(
                    recall_at_1(ti, scores, w, "weighted", ("image", "text"), held), 4
                ),
                "held_out_image_only": round(recall_at_1(ti, scores, w, "weighted", ("image",), held), 4),
                "held_out_text_only": round(recall_at_1(ti, scores, w, "weighted", ("text",), held), 4),
            }
        )
    out["learned"] = folds
    out["same_product_threshold"] = threshold(ti, scores, default)
    out["fused_learned_held_out"] = statistics.mean(float(f["held_out_recall_at_1"]) for f in folds)
    best_single = max(out["image_only"], out["text_only"])
    out["best_single"] = best_single
    out["fused_minus_best_single_points"] = round(100 * (out["fused_weighted"] - best_single), 1)
    out["target_met"] = out["fused_weighted"] >= best_single + 0.05
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def http_latency(requests_per_level: int = 60, url: str | None = None) -> dict:
    """Text-only and hybrid ``/food/search`` at 1 and 4 clients, on a real server over a scratch
    store with the food demo domain built (pretrained, titles from ``demo/food/metadata.csv``)."""

    from simserver.bench.server import Server
    from simserver.domain_config import load_domains
    from simserver.ingest import read_folder
    from simserver.repository import Repository
    from simserver.settings import PROJECT_ROOT
    from simserver.store import LocalStore
    from simserver.training import train_domain

    rows = metadata_rows()
    texts = [r["title"] for r in rows]
    images = [(r["filename"], (FOOD / r["filename"]).read_bytes()) for r in rows]
    if url is not None:  # a running server with the food demo domain
        return _latency(url, texts, images, requests_per_level)
    scratch = Path(tempfile.mkdtemp(prefix="bench-match-"))
    domains = scratch / "domains"
    domains.mkdir()
    cfg = load_domains(PROJECT_ROOT / "domains")["food"]
    (domains / "food.yaml").write_text((PROJECT_ROOT / "domains" / "food.yaml").read_text())
    store = scratch / "store"
    from simserver.encoder_pool import EncoderPool, LocalBackend
    from simserver.settings import get_settings

    backend = LocalBackend(EncoderPool.from_settings(get_settings()), cfg.encoder)
    dataset = read_folder(FOOD, cfg.limits)
    train_domain(Repository(LocalStore(store)), cfg, dataset, backend, mode="pretrained")
    env = {"STORE_URI": f"file://{store}", "DOMAINS_DIR": str(domains)}
    with Server(scratch, env=env) as server:
        return _latency(server.url, texts, images, requests_per_level)


def _latency(url: str, texts: list[str], images: list[tuple[str, bytes]], requests_per_level: int) -> dict:
    import requests

    out: dict = {"load_average_before": [round(x, 2) for x in os.getloadavg()]}
    local = threading.local()

    def one(kind: str, i: int) -> tuple[int, float]:
        if not hasattr(local, "s"):
            local.s = requests.Session()
        data = {"top_k": "5"} if kind == "image" else {"text": texts[i % len(texts)], "top_k": "5"}
        files = None if kind == "text" else {"image": images[(i * 7) % len(images)]}
        t0 = time.perf_counter()
        r = local.s.post(f"{url}/food/search", data=data, files=files, timeout=60)
        return r.status_code, (time.perf_counter() - t0) * 1000

    for kind in ("image", "text", "hybrid"):
        for clients in (1, 4):
            one(kind, 0)  # warm
            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                res = list(pool.map(lambda i, k=kind: one(k, i), range(requests_per_level)))
            wall = time.perf_counter() - t0
            ms = sorted(m for _, m in res)
            q = statistics.quantiles(ms, n=100)
            out[f"{kind}_{clients}_clients"] = {
                "requests": requests_per_level,
                "errors": sum(c != 200 for c, _ in res),
                "p50_ms": round(q[49], 1),
                "p95_ms": round(q[94], 1),
                "rps": round(requests_per_level / wall, 1),
            }
            logger.info("%s, %d clients: %s", kind, clients, out[f"{kind}_{clients}_clients"])
    out["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return out


def group_scan(n_group: int = 300, n_against: int = 6000, seed: int = 0) -> dict:
    """The match-groups scan (:meth:`simserver.hybrid.TextIndex.rows_against` + fusion) on random
    unit vectors of the served sizes, beside the whole-catalog scan per item it replaced (timed on
    100 items, scaled)."""
    from simserver.metrics import l2_normalize

    rng = np.random.default_rng(seed)
    n = n_group + n_against
    items = [
        Item(
            f"i{i}",
            "x",
            "",
            "image/png",
            {"title": f"thing {i % 977} {i % 13} g", "shop": "ab"[i >= n_group]},
        )
        for i in range(n)
    ]
    image = l2_normalize(rng.normal(size=(n, 1280)).astype(np.float32))
    text = l2_normalize(rng.normal(size=(n, 384)).astype(np.float32))
    ti = text_index(items, image, text, TextConfig(fields=["title"], group="shop"), "cosine")
    rows, against = np.arange(n_group), np.arange(n_group, n)
    mask = np.zeros(n, bool)
    mask[against] = True
    load = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    for scores in ti.rows_against(rows, against):
        ti.search(scores, 1, np.ones(n_against, bool), Weights(), "weighted")
    scan = time.perf_counter() - t0
    t0 = time.perf_counter()
    for r in rows[:100]:
        ti.search(ti.row_scores(int(r)), 1, mask, Weights(), "weighted")
    whole = (time.perf_counter() - t0) * n_group / 100
    return {
        "group": n_group,
        "against": n_against,
        "seconds": round(scan, 3),
        "comparisons_per_s": round(n_group * n_against / scan),
        "whole_catalog_per_item_seconds": round(whole, 3),
        "load_average": load,
    }
