"""Image + text search over one catalog version: per-modality scores, then fusion.

The text of an item is its ``text.fields`` metadata columns joined. Its **text score** against a
query text mixes two cosines: the sentence encoder's (:mod:`simserver.text_encoder`; catches
reworded and reordered titles) and a character 3-5-gram TF-IDF's (scikit-learn; catches SKUs,
sizes, typos and abbreviations that an embedding blurs), ``lexical`` being the TF-IDF's share.
The **image score** is the catalog's own score of the image vectors (``metrics.distance_to_score``).

Fusion (``fusion``): each modality's ``candidates`` best rows among the live items matching the
filter are pooled; over that union, ``weighted`` min-max normalises each modality's scores and
takes their weighted mean, ``rrf`` sums ``w / (60 + rank)`` (reciprocal-rank fusion, rank within
the modality's whole ranking). A one-modality query is that modality's ranking.

A :class:`TextIndex` is built once per served version (dense text vectors come per segment, from
the caller, so they are versioned and cached with the segments), and scans exactly: a brute-force
matrix product over the live rows, which is milliseconds up to ~100k items here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from simserver import metrics
from simserver.catalog import Catalog
from simserver.filters import Filter
from simserver.index import Item
from simserver.schemas import Hit
from simserver.text_config import TextConfig, Weights

logger = logging.getLogger(__name__)

RRF_K = 60.0
MODALITIES = ("image", "text")


def item_text(item: Item, fields: list[str]) -> str:
    """An item's text: its ``fields`` metadata columns (``name`` and ``label`` are allowed too)."""
    parts = []
    for f in fields:
        if f == "name":
            parts.append(item.name)
        elif f == "label":
            parts.append(item.label)
        else:
            parts.append(item.metadata.get(f, ""))
    return " ".join(p.strip() for p in parts if p and p.strip())


class Lexical:
    """Character 3-5-gram TF-IDF over a catalog's texts (fitted on them)."""

    def __init__(self, texts: list[str]) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        self._vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), lowercase=True, sublinear_tf=True)
        self.matrix = None
        if any(t.strip() for t in texts):
            try:
                self.matrix = self._vec.fit_transform(texts)  # rows L2-normalised
            except ValueError:  # no n-gram at all (texts of one or two characters)
                self.matrix = None

    def scores(self, query: str) -> np.ndarray | None:
        if self.matrix is None:
            return None
        q = self._vec.transform([query])
        return np.asarray((self.matrix @ q.T).todense(), dtype=np.float64).ravel()


@dataclass
class Candidate:
    row: int
    score: float
    scores: dict[str, float]


class TextIndex:
    """One version's live rows (catalog order) with their image vectors, texts, dense text vectors
    and TF-IDF rows."""

    def __init__(self, catalog: Catalog, cfg: TextConfig, dense: dict[str, np.ndarray]) -> None:
        """``dense``: segment id -> text vectors of all its rows (unit, float32)."""
        self.catalog = catalog
        self.cfg = cfg
        # The live items in catalog order; their image vectors stay in the segments (no copy).
        self.items = list(catalog.iter_items())
        chunks = [
            dense[seg.sid][np.flatnonzero(a)] for seg, a in zip(catalog.segments, catalog.alive, strict=True)
        ]
        dim = next((c.shape[1] for c in chunks if c.ndim == 2), 0)
        self.text_vectors = (
            np.concatenate([c.reshape(-1, dim) for c in chunks]) if chunks else np.zeros((0, dim), np.float32)
        )
        self.texts = [item_text(it, cfg.fields) for it in self.items]
        self.lexical = Lexical(self.texts)
        self.rows = {it.id: r for r, it in enumerate(self.items)}

    def __len__(self) -> int:
        return len(self.items)

    def mask(self, filt: Filter | None) -> np.ndarray:
        """Which live rows match ``filt`` (all of them without one)."""
        if not filt:
            return np.ones(len(self.items), dtype=bool)
        parts = [m[a] for m, a in zip(self.catalog.matching(filt), self.catalog.alive, strict=True)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)

    def image_scores(self, vector: np.ndarray) -> np.ndarray:
        q = np.asarray(vector, dtype=np.float32).ravel()
        parts = [
            self._distances(seg.vectors, q)[alive]
            for seg, alive in zip(self.catalog.segments, self.catalog.alive, strict=True)
        ]
        d = np.concatenate(parts) if parts else np.zeros(0)
        return np.asarray(metrics.distance_to_score(self.catalog.metric, d), dtype=np.float64)

    def _distances(self, x: np.ndarray, q: np.ndarray) -> np.ndarray:
        metric = self.catalog.metric
        if metric == "cosine":
            q = metrics.l2_normalize(q)
        if metric in ("cosine", "ip"):
            return 1.0 - (x @ q).astype(np.float64)
        if metric == "l2":
            return np.sqrt(np.maximum(((x - q) ** 2).sum(axis=1), 0.0)).astype(np.float64)
        return np.abs(x - q).sum(axis=1).astype(np.float64)

    def image_vectors(self, rows: np.ndarray) -> np.ndarray:
        """The stored image vectors of live rows ``rows`` (a copy of those rows only)."""
        starts = np.cumsum([0] + [int(a.sum()) for a in self.catalog.alive])
        out = np.empty((len(rows), self.catalog.dim), np.float32)
        for s, (seg, alive) in enumerate(zip(self.catalog.segments, self.catalog.alive, strict=True)):
            inside = (rows >= starts[s]) & (rows < starts[s + 1])
            if inside.any():
                out[inside] = seg.vectors[np.flatnonzero(alive)[rows[inside] - starts[s]]]
        return out

    def rows_against(
        self, rows: np.ndarray, against: np.ndarray, chunk: int = 256
    ) -> Iterator[dict[str, np.ndarray]]:
        """For each live row of ``rows``, both modalities' scores against the live rows ``against``
        only (stored vectors; what :meth:`row_scores` gives, restricted to those rows, without
        scanning the rest of the catalog), computed ``chunk`` rows at a time as matrix products."""
        targets = self.image_vectors(against)
        target_text = self.text_vectors[against].astype(np.float64)
        matrix = self.lexical.matrix
        lex_t = matrix[against].T.tocsc() if matrix is not None else None
        metric = self.catalog.metric
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            queries = self.image_vectors(part)
            if metric in ("cosine", "ip"):  # the stored vectors are unit for cosine
                d = 1.0 - (queries @ targets.T).astype(np.float64)
            else:
                d = np.stack([self._distances(targets, q) for q in queries])
            image = np.asarray(metrics.distance_to_score(metric, d), dtype=np.float64)
            text = np.clip(self.text_vectors[part].astype(np.float64) @ target_text.T, 0.0, 1.0)
            if matrix is not None and lex_t is not None:
                # Each row's own TF-IDF row: its text as transformed when the TF-IDF was fitted.
                lexical = np.asarray((matrix[part] @ lex_t).todense(), dtype=np.float64)
                text = (1.0 - self.cfg.lexical) * text + self.cfg.lexical * np.clip(lexical, 0.0, 1.0)
            for i in range(len(part)):
                yield {"image": image[i], "text": text[i]}

    def image_vector(self, row: int) -> np.ndarray:
        vector = self.catalog.vector(self.items[row].id)
        assert vector is not None  # a live row
        return vector

    def row_scores(self, row: int) -> dict[str, np.ndarray]:
        """Both modalities' scores of every live row against live row ``row`` (its stored vectors)."""
        return {
            "image": self.image_scores(self.image_vector(row)),
            "text": self.text_scores(self.text_vectors[row], self.texts[row]),
        }

    def text_scores(self, vector: np.ndarray, text: str) -> np.ndarray:
        dense = np.clip(
            self.text_vectors.astype(np.float64) @ np.asarray(vector, np.float64).ravel(), 0.0, 1.0
        )
        lex = self.lexical.scores(text)
        if lex is None:
            return dense
        return (1.0 - self.cfg.lexical) * dense + self.cfg.lexical * np.clip(lex, 0.0, 1.0)

    def search(
        self,
        scores: dict[str, np.ndarray],
        top_k: int,
        mask: np.ndarray,
        weights: Weights,
        fusion: str,
        exclude: int | None = None,
    ) -> list[Candidate]:
        """The fused ``top_k`` rows among ``mask``; ``scores``: modality -> score per live row."""
        return fuse(scores, top_k, mask, weights, fusion, self.cfg.candidates, exclude)

    def hits(self, found: list[Candidate]) -> list[Hit]:
        out = []
        for c in found:
            it = self.items[c.row]
            out.append(
                Hit(
                    id=it.id,
                    name=it.name,
                    label=it.label,
                    score=float(np.clip(c.score, 0.0, 1.0)),
                    distance=float(1.0 - np.clip(c.score, 0.0, 1.0)),
                    metadata=dict(it.metadata),
                    scores={k: round(float(v), 6) for k, v in c.scores.items()},
                )
            )
        return out


def _top(values: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` rows of ``rows`` with the highest ``values`` (best first, ties by row)."""
    v = values[rows]
    if n < len(rows):
        part = np.argpartition(-v, n - 1)[:n]
        rows, v = rows[part], v[part]
    return rows[np.lexsort((rows, -v))]


def fuse(
    scores: dict[str, np.ndarray],
    top_k: int,
    mask: np.ndarray,
    weights: Weights,
    fusion: str,
    candidates: int,
    exclude: int | None = None,
) -> list[Candidate]:
    mask = mask.copy()
    if exclude is not None:
        mask[exclude] = False
    rows = np.flatnonzero(mask)
    if not len(rows) or not scores or top_k <= 0:
        return []
    if len(scores) == 1:
        ((name, s),) = scores.items()
        best = _top(s, rows, min(top_k, len(rows)))
        return [Candidate(int(r), float(s[r]), {name: float(s[r])}) for r in best]
    w = {"image": weights.image, "text": weights.text}
    pool = np.unique(np.concatenate([_top(s, rows, min(candidates, len(rows))) for s in scores.values()]))
    fused = np.zeros(len(pool))
    total = sum(w[m] for m in scores)
    for m, s in scores.items():
        if fusion == "rrf":
            order = rows[np.lexsort((rows, -s[rows]))]
            rank = np.empty(len(s), dtype=np.int64)
            rank[order] = np.arange(1, len(order) + 1)
            fused += w[m] * (1.0 / (RRF_K + rank[pool]))
        else:
            v = s[pool]
            lo, hi = float(v.min()), float(v.max())
            fused += w[m] * ((v - lo) / (hi - lo) if hi > lo else np.ones_like(v))
    fused /= total
    if fusion == "rrf":  # best possible: rank 1 in every modality -> 1/(K+1); rescaled to [0, 1]
        fused *= RRF_K + 1.0
    order = np.lexsort((pool, -fused))[:top_k]
    return [
        Candidate(int(pool[i]), float(fused[i]), {m: float(s[pool[i]]) for m, s in scores.items()})
        for i in order
    ]


def absolute(scores: dict[str, float], weights: Weights) -> float:
    """The weighted mean of a pair's own modality scores (no normalisation over other candidates):
    what a same-product decision thresholds."""
    w = {"image": weights.image, "text": weights.text}
    total = sum(w[m] for m in scores)
    if total <= 0:  # only a modality weighted 0 was sent: its own score
        return float(np.mean(list(scores.values())))
    return float(sum(w[m] * scores[m] for m in scores) / total)
