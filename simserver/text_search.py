"""Text and hybrid search, and product matching across groups, on the version served now.

Text vectors are versioned with the image index: each segment's are a pure function of its items
(immutable, stored in the segment's ``items.json``) and the text encoder, so they are computed once
per segment and stored beside it (``domains/<d>/segments/<sid>/text-<key>.npy``, written once;
garbage-collected with the segment). A new version costs only its new (delta) segments' texts;
the index service computes them before it serves the version (its warm-up).

No BentoML here: the index service passes the two encoders (image, text) as async callables.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import anyio
import numpy as np
from pydantic import ValidationError

from simserver.catalog import Catalog
from simserver.domain_config import DomainConfig
from simserver.errors import Conflict, RequestRefused, TooLarge, UnknownItem
from simserver.filters import Filter
from simserver.hybrid import TextIndex, absolute, item_text
from simserver.repository import Repository
from simserver.schemas import GroupMatch, GroupPair, GroupPairsReply, MatchReply, SearchReply
from simserver.searcher import EncodeFn, served_encoder
from simserver.text_config import FUSIONS, TextConfig, Weights

logger = logging.getLogger(__name__)

# (texts, text encoder) -> float32 [N, D] unit vectors
EncodeTextFn = Callable[[list[str], str], Awaitable[np.ndarray]]
KEEP_VERSIONS = 2
# match_groups compares every item of the group with every item of the other: at most this many
# comparisons called directly (a synchronous answer), and as a task. Measured 0.24M to 2.1M
# comparisons a second (`simserver bench match --group-scan`, load average 5.5 to 7.2): the task's
# bound stays under the index service's 900 s call timeout at the slowest rate.
MAX_GROUP_SCAN = 20_000_000
MAX_GROUP_SCAN_TASK = 150_000_000


def text_config(cfg: DomainConfig) -> TextConfig:
    text = getattr(cfg, "text", None)
    if text is None:
        raise RequestRefused(
            f"domain {cfg.name!r} has no text configured: add text: {{fields: [title]}} to its yaml"
        )
    return text


def check_query_text(text: str | None, cfg: TextConfig) -> str | None:
    if text is None:
        return None
    if not text.strip():
        raise RequestRefused("text: empty; send some words, or leave text out")
    if len(text) > cfg.max_query_chars:
        raise RequestRefused(f"text: {len(text)} characters, over the limit of {cfg.max_query_chars}")
    return text


def parse_weights(raw: object) -> dict | None:
    """``weights`` as a form sends it: JSON text (or already decoded by BentoML)."""
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise RequestRefused('weights: not JSON; send e.g. {"image": 0.3, "text": 0.7}') from None
    if not isinstance(raw, dict):
        raise RequestRefused('weights: a JSON object, e.g. {"image": 0.3, "text": 0.7}')
    return raw


def check_fusion(weights: dict | None, fusion: str | None, cfg: TextConfig) -> tuple[Weights, str]:
    try:
        w = Weights.model_validate(weights) if weights is not None else cfg.weights
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise RequestRefused(f"weights{'.' + where if where else ''}: {first['msg']}") from None
    f = fusion or cfg.fusion
    if f not in FUSIONS:
        raise RequestRefused(f"fusion: unknown {f!r} (use one of {', '.join(FUSIONS)})")
    return w, f


def _sidecar_key(domain: str, sid: str, cfg: TextConfig) -> str:
    key = hashlib.sha256(f"{cfg.encoder}|{'|'.join(cfg.fields)}".encode()).hexdigest()[:12]
    return f"domains/{domain}/segments/{sid}/text-{key}.npy"


class TextSearcher:
    def __init__(
        self,
        cfg: DomainConfig,
        repo: Repository,
        current: Callable[[], Catalog | None],
        encode: EncodeFn,
        encode_text: EncodeTextFn,
    ) -> None:
        self.cfg = cfg
        self.text = text_config(cfg)
        self.repo = repo
        self.current = current
        self.encode = encode
        self.encode_text = encode_text
        self._indexes: OrderedDict[str, TextIndex] = OrderedDict()
        self._segments: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    # -- the text side of a version ------------------------------------------------------------
    async def _segment_vectors(self, catalog: Catalog) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for seg in catalog.segments:
            got = self._segments.get(seg.sid)
            key = _sidecar_key(self.cfg.name, seg.sid, self.text)
            if got is None:
                try:
                    raw = await anyio.to_thread.run_sync(self.repo.store.get, key)
                    got = np.load(io.BytesIO(raw), allow_pickle=False)
                except KeyError:
                    got = None
            if got is None or len(got) != len(seg):
                texts = [item_text(it, self.text.fields) for it in seg.items]
                got = np.asarray(await self.encode_text(texts, self.text.encoder), dtype=np.float32)
                buf = io.BytesIO()
                np.save(buf, got, allow_pickle=False)
                await anyio.to_thread.run_sync(self.repo.store.put, key, buf.getvalue())
            self._segments[seg.sid] = got
            out[seg.sid] = got
        return out

    async def index(self, catalog: Catalog | None = None) -> TextIndex:
        """The text index of ``catalog`` (default: the version served now), built once per version."""
        catalog = catalog or self.current()
        if catalog is None:
            raise Conflict(f"domain {self.cfg.name!r} has no index yet: train it first")
        got = self._indexes.get(catalog.version)
        if got is not None:
            return got
        dense = await self._segment_vectors(catalog)
        built = await anyio.to_thread.run_sync(TextIndex, catalog, self.text, dense)
        with self._lock:
            self._indexes[catalog.version] = built
            while len(self._indexes) > KEEP_VERSIONS:
                self._indexes.popitem(last=False)
            live = {s.sid for ti in self._indexes.values() for s in ti.catalog.segments}
            for sid in [s for s in self._segments if s not in live]:
                del self._segments[sid]
        return built

    # -- queries ---------------------------------------------------------------------------------
    async def _scores(
        self, ti: TextIndex, image: np.ndarray | None, text: str | None, item_id: str | None = None
    ) -> dict[str, np.ndarray]:
        scores: dict[str, np.ndarray] = {}
        if item_id is not None:
            row = ti.rows.get(item_id)
            if row is None:
                raise UnknownItem(f"domain {self.cfg.name!r} has no item {item_id!r}")
            return ti.row_scores(row)

        # The two encodes are calls to the encoder service: made together, not one after the other.
        async def image_scores(query: np.ndarray) -> None:
            pixels = np.asarray(query, dtype=np.uint8).reshape((1, *query.shape[-3:]))
            vec = np.asarray(await self.encode(pixels, served_encoder(ti.catalog, self.cfg)), np.float32)
            if vec.shape[-1] != ti.catalog.dim:
                raise Conflict(
                    f"domain {self.cfg.name!r}: the encoder gives {vec.shape[-1]}-d vectors: retrain"
                )
            scores["image"] = ti.image_scores(vec[0])

        async def text_scores(query: str) -> None:
            tvec = np.asarray(await self.encode_text([query], self.text.encoder), np.float32)[0]
            scores["text"] = await anyio.to_thread.run_sync(ti.text_scores, tvec, query)

        # gather, not a task group: a refusal must reach the caller as itself, not in an ExceptionGroup.
        await asyncio.gather(
            *([image_scores(image)] if image is not None else []),
            *([text_scores(text)] if text is not None else []),
        )
        return {m: scores[m] for m in ("image", "text") if m in scores}

    def served(
        self, ti: TextIndex, weights: dict | None, fusion: str | None, threshold: float | None = None
    ) -> tuple[Weights, str, float, str]:
        """(weights, fusion, match threshold, where the weights come from) for a query on ``ti``'s
        version: the request's, else those its training learned (``fusion`` in the version's
        manifest, :mod:`simserver.fusion_learning`), else the yaml's."""
        w, f = check_fusion(weights, fusion, self.text)
        learned = ti.catalog.meta.get("fusion") or {}
        if not learned.get("learned"):
            learned = {}
        limit = (
            threshold if threshold is not None else learned.get("match_threshold", self.text.match_threshold)
        )
        if weights is not None:
            return w, f, float(limit), "request"
        if learned:
            return Weights.model_validate(learned["weights"]), f, float(limit), "version"
        return w, f, float(limit), "domain"

    async def search(
        self,
        image: np.ndarray | None,
        text: str | None,
        top_k: int,
        filt: Filter | None = None,
        weights: dict | None = None,
        fusion: str | None = None,
    ) -> SearchReply:
        """Items nearest an image, a text, or both (fused), among those matching ``filt``."""
        text = check_query_text(text, self.text)
        w, f = check_fusion(weights, fusion, self.text)
        if image is None and text is None:
            raise RequestRefused("send an 'image', a 'text', or both")
        ti = await self.index()
        w, f, _, _ = self.served(ti, weights, fusion)
        scores = await self._scores(ti, image, text)
        found = ti.search(scores, top_k, ti.mask(filt), w, f)
        return SearchReply(domain=self.cfg.name, version=ti.catalog.version, results=ti.hits(found))

    def _group_column(self) -> str:
        if not self.text.group:
            raise RequestRefused(
                f"domain {self.cfg.name!r} names no text.group column: matching is across groups"
            )
        return self.text.group

    async def match_groups(
        self,
        group: str,
        against: str,
        weights: dict | None = None,
        fusion: str | None = None,
        threshold: float | None = None,
        max_scan: int = MAX_GROUP_SCAN,
    ) -> GroupPairsReply:
        """Every item of ``group`` with its best match in ``against`` (stored vectors, no encoding),
        best ``match_score`` first; ``max_scan``: the most comparisons (items of group x of against)."""
        column = self._group_column()
        w, f = check_fusion(weights, fusion, self.text)
        if group == against:
            raise RequestRefused("group and against must be two different groups")
        ti = await self.index()
        w, f, limit, weights_from = self.served(ti, weights, fusion, threshold)
        groups = np.asarray([it.metadata.get(column, "") for it in ti.items], dtype=object)
        known = sorted({str(g) for g in groups if g})
        for name, value in (("group", group), ("against", against)):
            if value not in known:
                raise RequestRefused(f"{name}: no item has {column} {value!r} (groups: {', '.join(known)})")
        rows = np.flatnonzero(groups == group)
        against_rows = np.flatnonzero(groups == against)
        if len(rows) * len(against_rows) > max_scan:
            raise TooLarge(
                f"{len(rows)} items x {len(against_rows)} in {against!r} is over {max_scan:,} comparisons"
                + (
                    f": submit it as a task (POST /{self.cfg.name}/match/groups/submit)"
                    if max_scan < MAX_GROUP_SCAN_TASK
                    else ": use /match per item"
                )
            )
        everywhere = np.ones(len(against_rows), dtype=bool)

        def pairs() -> list[GroupPair]:
            out = []
            # Scored against the other group's items only: in catalog order, so fused ranks and
            # ties are those of the whole catalog restricted to that group.
            for r, scores in zip(rows, ti.rows_against(rows, against_rows), strict=True):
                found = ti.search(scores, 1, everywhere, w, f)
                if found:
                    found[0].row = int(against_rows[found[0].row])
                    value = absolute(found[0].scores, w)
                    hit = ti.hits(found)[0]
                    out.append(
                        GroupPair(id=ti.items[r].id, hit=hit, match_score=value, same_product=value >= limit)
                    )
            return sorted(out, key=lambda p: -p.match_score)

        return GroupPairsReply(
            domain=self.cfg.name,
            version=ti.catalog.version,
            group=group,
            against=against,
            threshold=limit,
            pairs=await anyio.to_thread.run_sync(pairs),
            weights=w.model_dump(),
            weights_from=weights_from,
        )

    async def match(
        self,
        image: np.ndarray | None = None,
        text: str | None = None,
        item_id: str | None = None,
        group: str | None = None,
        weights: dict | None = None,
        fusion: str | None = None,
        threshold: float | None = None,
    ) -> MatchReply:
        """The best match in each group (other than the query's own ``group``), with a
        same-product decision: the weighted mean of the pair's own scores >= the threshold."""
        column = self._group_column()
        text = check_query_text(text, self.text)
        w, f = check_fusion(weights, fusion, self.text)
        if item_id is None and image is None and text is None:
            raise RequestRefused("send an item 'id', or an 'image' and/or a 'text'")
        if item_id is not None and (image is not None or text is not None):
            raise RequestRefused("send either an item 'id' or an 'image'/'text', not both")
        ti = await self.index()
        w, f, limit, weights_from = self.served(ti, weights, fusion, threshold)
        scores = await self._scores(ti, image, text, item_id)
        groups = np.asarray([it.metadata.get(column, "") for it in ti.items], dtype=object)
        own = group
        exclude = None
        if item_id is not None:
            exclude = ti.rows[item_id]
            own = ti.items[exclude].metadata.get(column, "") if own is None else own
        matches = []
        for g in sorted({str(x) for x in groups if x} - {own or ""}):
            found = ti.search(scores, 1, groups == g, w, f, exclude)
            if not found:
                continue
            hit = ti.hits(found)[0]
            value = absolute(found[0].scores, w)
            matches.append(GroupMatch(group=g, hit=hit, match_score=value, same_product=value >= limit))
        return MatchReply(
            domain=self.cfg.name,
            version=ti.catalog.version,
            group=own,
            threshold=limit,
            matches=matches,
            weights=w.model_dump(),
            weights_from=weights_from,
        )
