"""Changing a domain's catalog without a training: upsert, delete, compact, list.

Each change writes what it adds (one delta segment, one tombstone blob), then commits a new version
with :meth:`simserver.repository.Repository.commit` (compare-and-set on the pointer; a change that
loses the race is re-applied on the new head). Upserted items are encoded with the encoder the head
version serves (no fine-tuning); if a training replaced that encoder meanwhile, they are encoded
again with the new one before the change is re-applied.

Compaction (:func:`compact`) keeps searches fast as deltas accumulate, in three tiers, each costing
what it rewrites and not the whole catalog unless it must:

* more than ``compact_max_deltas`` delta segments: the deltas are merged into one (exact scan);
* delta rows over ``compact_delta_fraction`` of the base (and over ``compact_min_rows``), or more
  than ``compact_dead_fraction`` of all rows deleted/replaced: a new base (FAISS index rebuilt);
* many tombstone blobs: folded into one.

Plain functions over a :class:`Repository`, no BentoML: the index service calls them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np

from simserver import metrics
from simserver.builder import decode_batch
from simserver.catalog import Catalog, CatalogPolicy
from simserver.domain_config import DomainConfig
from simserver.errors import Conflict, RequestRefused, UnknownItem
from simserver.filters import Filter
from simserver.index import DomainIndex, Item
from simserver.ingest import Dataset, iter_chunks
from simserver.repository import Repository, image_key, now_iso
from simserver.schemas import DeleteReply, ItemPage, ItemRecord, ItemsReply, VersionInfo

logger = logging.getLogger(__name__)

# (uint8 images [N, S, S, 3], encoder) -> float32 [N, D]
EncodeFn = Callable[[np.ndarray, str], Awaitable[np.ndarray]]
MAX_TOMBSTONE_BLOBS = 32
# (head, upload, its vectors) -> (rows of the upload to keep, duplicates to report); may refuse
ScreenFn = Callable[[Catalog, Dataset, np.ndarray], tuple[list[int], list]]


class EncoderChanged(Exception):
    """The head's encoder is not the one the upload was encoded with: encode again."""


def no_version(domain: str) -> Conflict:
    return Conflict(f"domain {domain!r} has no version yet: train it first (POST /{domain}/train/submit)")


def _encoder_of(catalog: Catalog, cfg: DomainConfig) -> str:
    return catalog.encoder or cfg.encoder


# -- upsert --------------------------------------------------------------------------------------
async def upsert(
    repo: Repository,
    cfg: DomainConfig,
    dataset: Dataset,
    encode: EncodeFn,
    batch_size: int = 32,
    screen: ScreenFn | None = None,
) -> tuple[ItemsReply, Catalog]:
    """Add or replace ``dataset``'s samples by id, encoded with the served encoder. ``screen``
    (duplicate detection) sees the encoded upload against the head first and says which samples
    to keep and what to report (``ItemsReply.duplicates``)."""
    domain = cfg.name
    for _ in range(5):
        version = await anyio.to_thread.run_sync(repo.current_version, domain)
        if version is None:
            raise no_version(domain)
        head = await anyio.to_thread.run_sync(repo.load, domain, version)
        encoder = _encoder_of(head, cfg)
        chunks = []
        for batch in iter_chunks(dataset.samples, batch_size):
            pixels = await anyio.to_thread.run_sync(decode_batch, batch)
            chunks.append(np.asarray(await encode(pixels, encoder), dtype=np.float32))
        vectors = np.concatenate(chunks)
        if vectors.shape[1] != head.dim:
            raise Conflict(
                f"domain {domain!r}: version {head.version} holds {head.dim}-d vectors but {encoder} gives "
                f"{vectors.shape[1]}-d ones: retrain"
            )
        found: list = []
        todo = dataset
        if screen is not None:
            keep, found = await anyio.to_thread.run_sync(screen, head, dataset, vectors)
            todo = Dataset([dataset.samples[i] for i in keep], dataset.skipped)
            vectors = vectors[keep]
            if not todo.samples:  # every item a duplicate, skipped: nothing to commit
                reply = ItemsReply(
                    version=head.version, added=0, replaced=0, skipped=dataset.skipped, count=head.count
                )
                return reply.model_copy(update={"duplicates": found}), head
        try:
            reply, catalog = await anyio.to_thread.run_sync(
                _commit_upsert, repo, cfg, todo, vectors, encoder, head.dim
            )
            return reply.model_copy(update={"duplicates": found}), catalog
        except EncoderChanged:
            logger.info("domain %s: the served encoder changed during an upload; encoding again", domain)
    raise Conflict(f"domain {domain!r}: its encoder kept changing during the upload; send it again")


def _commit_upsert(
    repo: Repository, cfg: DomainConfig, dataset: Dataset, vectors: np.ndarray, encoder: str, dim: int
) -> tuple[ItemsReply, Catalog]:
    domain = cfg.name
    if cfg.metric == "cosine":
        vectors = metrics.l2_normalize(vectors)
    created = now_iso()
    items = []
    for s in dataset.samples:
        key = image_key(domain, s.data, s.media_type)
        repo.put_image(key, s.data)
        items.append(Item(s.name, s.label, key, s.media_type, dict(s.metadata), s.id, created))
    seg = repo.write_segment(domain, items, vectors)
    counts = {"replaced": 0}

    def change(head: Catalog | None) -> tuple[dict[str, Any], Catalog] | None:
        if head is None:
            raise no_version(domain)
        if _encoder_of(head, cfg) != encoder or head.dim != dim:
            raise EncoderChanged
        if any(s["id"] == seg["id"] for s in head.meta["segments"]):
            return None  # applied already (a commit that looked lost but was not)
        dead: dict[str, list[int]] = {}
        for it in items:
            if (where := head.locate(it.id)) is not None:
                dead.setdefault(head.segments[where[0]].sid, []).append(where[1])
        counts["replaced"] = sum(len(r) for r in dead.values())
        tombs = list(head.meta.get("tombstones", []))
        if dead:
            tombs.append(repo.write_tombstones(domain, dead))
        return repo.new_manifest(
            domain,
            head,
            "items",
            [*head.meta["segments"], seg],
            tombs,
            change={"added": len(items) - counts["replaced"], "replaced": counts["replaced"]},
        )

    catalog = repo.commit(domain, change)
    assert catalog is not None
    reply = ItemsReply(
        version=catalog.version,
        added=len(items) - counts["replaced"],
        replaced=counts["replaced"],
        skipped=dataset.skipped,
        count=catalog.count,
    )
    return reply, catalog


# -- delete --------------------------------------------------------------------------------------
def delete(
    repo: Repository,
    domain: str,
    ids: list[str] | None = None,
    filt: Filter | None = None,
    must_exist: bool = False,
) -> tuple[DeleteReply, Catalog]:
    """Delete items by id or by filter. ``must_exist``: an unknown id is a 404 (one-item route)."""
    if ids is None and filt is None:
        raise RequestRefused('send {"ids": [...]} or {"filter": {...}}')
    counts = {"deleted": 0}

    def change(head: Catalog | None) -> tuple[dict[str, Any], Catalog] | None:
        if head is None:
            raise no_version(domain)
        dead: dict[str, list[int]] = {}
        if ids is not None:
            for item_id in dict.fromkeys(ids):
                where = head.locate(item_id)
                if where is None:
                    if must_exist:
                        raise UnknownItem(f"domain {domain!r} has no item {item_id!r}")
                    continue
                dead.setdefault(head.segments[where[0]].sid, []).append(where[1])
        else:
            for seg, mask in zip(head.segments, head.matching(filt), strict=True):
                if mask.any():
                    dead[seg.sid] = np.flatnonzero(mask).tolist()
        counts["deleted"] = sum(len(r) for r in dead.values())
        if not dead:
            return None
        tomb = repo.write_tombstones(domain, dead)
        return repo.new_manifest(
            domain,
            head,
            "delete",
            list(head.meta["segments"]),
            [*head.meta.get("tombstones", []), tomb],
            change={"deleted": counts["deleted"]},
        )

    catalog = repo.commit(domain, change)
    if catalog is None:
        raise no_version(domain)
    return DeleteReply(version=catalog.version, deleted=counts["deleted"], count=catalog.count), catalog


def set_meta(repo: Repository, domain: str, kind: str, **meta: Any) -> Catalog:
    """A new version with the head's items and ``meta`` added (e.g. an on-demand calibration)."""

    def change(head: Catalog | None) -> tuple[dict[str, Any], Catalog] | None:
        if head is None:
            raise no_version(domain)
        return repo.new_manifest(
            domain, head, kind, list(head.meta["segments"]), list(head.meta.get("tombstones", [])), **meta
        )

    catalog = repo.commit(domain, change)
    if catalog is None:
        raise no_version(domain)
    return catalog


# -- compaction ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    tier: str  # "major" (new base), "minor" (deltas merged), "tombstones" (blobs folded)
    merged: tuple[str, ...]  # segment ids rewritten into the new segment


def plan_compaction(catalog: Catalog, policy: CatalogPolicy) -> Plan | None:
    segs = catalog.segments
    base = segs[0] if segs and segs[0].kind == "base" else None
    deltas = [s for s in segs if s is not base]
    delta_rows = sum(len(s) for s in deltas)
    total = sum(len(s) for s in segs)
    base_rows = len(base) if base is not None else 0
    if total and (
        (delta_rows > policy.compact_min_rows and delta_rows > policy.compact_delta_fraction * base_rows)
        or (
            catalog.dead_rows > policy.compact_min_rows // 10
            and catalog.dead_rows > policy.compact_dead_fraction * total
        )
    ):
        return Plan("major", tuple(s.sid for s in segs))
    if len(deltas) > policy.compact_max_deltas:
        return Plan("minor", tuple(s.sid for s in deltas))
    if len(catalog.meta.get("tombstones", [])) > MAX_TOMBSTONE_BLOBS:
        return Plan("tombstones", ())
    return None


def compact(repo: Repository, cfg: DomainConfig, force: str | None = None) -> Catalog | None:
    """One compaction of the head if it needs one (``force``: "major" or "minor" regardless).
    Returns the new head, or None if nothing was done (or another writer compacted first)."""
    domain = cfg.name
    version = repo.current_version(domain)
    if version is None:
        return None
    head = repo.load(domain, version)
    plan = plan_compaction(head, repo.policy)
    if force == "major":
        plan = Plan("major", tuple(s.sid for s in head.segments))
    elif force == "minor":
        first_is_base = bool(head.segments) and head.segments[0].kind == "base"
        plan = Plan("minor", tuple(s.sid for s in head.segments[1 if first_is_base else 0 :]))
    if plan is None:
        return None
    merged = set(plan.merged)
    sources: list[tuple[str, int]] = []
    items: list[Item] = []
    chunks = []
    for seg, alive in zip(head.segments, head.alive, strict=True):
        if seg.sid in merged:
            rows = np.flatnonzero(alive)
            sources += [(seg.sid, int(r)) for r in rows]
            items += [seg.items[int(r)] for r in rows]
            chunks.append(seg.vectors[rows])
    new_seg: dict[str, Any] | None = None
    extra: dict[str, Any] = {}
    if plan.tier != "tombstones":
        vectors = np.concatenate(chunks) if chunks else np.zeros((0, head.dim), np.float32)
        if plan.tier == "major" and len(items):
            built = DomainIndex.build(
                vectors,
                items,
                metric=head.metric,
                encoder_id=head.meta.get("encoder_id", ""),
                version="compact",
                policy=cfg.index,
            )
            kind = built.meta["index_kind"]
            new_seg = repo.write_segment(
                domain, items, built.vectors, None if kind == "flat" else built.faiss, "base"
            )
            extra = {
                k: built.meta[k] for k in ("index_kind", "faiss_index", "recall_at_10", "bytes_per_vector")
            }
        else:
            new_seg = repo.write_segment(
                domain, items, vectors, None, "base" if plan.tier == "major" else "delta"
            )
    head_sids = {s.sid for s in head.segments}

    def change(now: Catalog | None) -> tuple[dict[str, Any], Catalog] | None:
        if now is None:
            return None
        now_sids = {s.sid: i for i, s in enumerate(now.segments)}
        if not merged <= set(now_sids):
            return None  # another writer compacted (or activated another version) first
        final: list[dict[str, Any]] = []
        dead: dict[str, list[int]] = {}
        placed = False
        for seg, meta_seg, alive in zip(now.segments, now.meta["segments"], now.alive, strict=True):
            if seg.sid in merged:
                if not placed and new_seg is not None:
                    final.append(new_seg)
                    placed = True
                continue
            final.append(meta_seg)
            if not alive.all():
                dead[seg.sid] = np.flatnonzero(~alive).tolist()
        if new_seg is not None and not placed:
            final.insert(0, new_seg)
        if new_seg is not None:
            gone = [i for i, (sid, row) in enumerate(sources) if not now.alive[now_sids[sid]][row]]
            if gone:
                dead[new_seg["id"]] = gone
        tombs = [repo.write_tombstones(domain, dead)] if dead else []
        changed = now.version != head.version or bool(head_sids - set(now_sids))
        logger.info(
            "domain %s: %s compaction of %s%s",
            domain,
            plan.tier,
            head.version,
            " (re-applied)" if changed else "",
        )
        return repo.new_manifest(domain, now, "compact", final, tombs, compaction=plan.tier, **extra)

    return repo.commit(domain, change)


# -- reading -------------------------------------------------------------------------------------
def record(item: Item) -> ItemRecord:
    return ItemRecord(
        id=item.id,
        name=item.name,
        label=item.label,
        metadata=dict(item.metadata),
        created_at=item.created_at or None,
    )


def page(domain: str, catalog: Catalog, filt: Filter | None, offset: int, limit: int) -> ItemPage:
    masks = catalog.matching(filt)
    total = int(sum(int(m.sum()) for m in masks))
    out: list[ItemRecord] = []
    skip = offset
    for seg, mask in zip(catalog.segments, masks, strict=True):
        if len(out) >= limit:
            break
        rows = np.flatnonzero(mask)
        if skip >= len(rows):
            skip -= len(rows)
            continue
        for r in rows[skip : skip + limit - len(out)]:
            out.append(record(seg.items[int(r)]))
        skip = 0
    return ItemPage(
        domain=domain, version=catalog.version, total=total, offset=offset, limit=limit, items=out
    )


def version_infos(repo: Repository, domain: str) -> list[VersionInfo]:
    served = repo.current_version(domain)
    out = []
    for m in repo.versions(domain):
        out.append(
            VersionInfo(
                version=m["version"],
                created_at=m.get("created_at"),
                count=int(m.get("count", 0) or 0),
                kind=m.get("kind", "train"),
                active=m["version"] == served,
                evaluation=m.get("evaluation"),
                parent=m.get("parent"),
                activated_from=m.get("activated_from"),
            )
        )
    return out
