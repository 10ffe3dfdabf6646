"""Domain versions in an artifact store: immutable segments, small version manifests, one pointer.

Layout under the store root::

    domains/<domain>/CURRENT                         pointer: {"version": ...}, compare-and-set
    domains/<domain>/versions/<version>/meta.json    manifest: segments, tombstones, kind, parent, ...
    domains/<domain>/versions/<version>/encoder.tar  a fine-tuned encoder (trainings that promote one)
    domains/<domain>/segments/<segment>/...          items.json, vectors.npy, [index.faiss], meta.json
    domains/<domain>/tombstones/<id>.json            {segment: [rows deleted or replaced]}
    domains/<domain>/images/<sha256>.<ext>           content-addressed images, shared by versions

Every blob but the pointer is written once and never changed. A change (a training, an upload, a
delete, an activation, a compaction) writes its new blobs, then a new manifest, then moves the
pointer with a compare-and-set (:meth:`ArtifactStore.put_if`); a writer that loses the race
re-applies its change on the new head (:meth:`Repository.commit`), so two replicas sharing one
bucket never lose an update. Readers follow the pointer and only ever see whole versions.

Versions written before segments existed (``format`` 1: ``index.faiss`` + ``items.json`` in the
version folder) load as a single base segment.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import faiss
import numpy as np

from simserver.catalog import Catalog, CatalogPolicy, Segment
from simserver.errors import Conflict, UnknownItem
from simserver.index import DomainIndex, Item
from simserver.store import ArtifactStore

logger = logging.getLogger(__name__)

FORMAT = 2
_EXT = {
    "image/jpeg": "jpg",
    "image/png": "png",
    "image/webp": "webp",
    "image/gif": "gif",
    "image/bmp": "bmp",
    "image/tiff": "tiff",
}
# What a new version inherits from its parent: what the vectors mean and how they were judged.
_PER_VERSION = {
    "version",
    "created_at",
    "kind",
    "parent",
    "segments",
    "tombstones",
    "count",
    "labels",
    "activated_from",
    "format",
    "change",
}


def new_version_id() -> str:
    """Sortable and unique even when two builds finish in the same second."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")[:-3] + "-" + secrets.token_hex(3)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def image_key(domain: str, data: bytes, media_type: str) -> str:
    digest = hashlib.sha256(data).hexdigest()
    return f"domains/{domain}/images/{digest}.{_EXT.get(media_type, 'bin')}"


def _npy(vectors: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(vectors, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


class WriteLost(RuntimeError):
    """A change could not be committed after many attempts (too many concurrent writers)."""


class Repository:
    def __init__(self, store: ArtifactStore, policy: CatalogPolicy | None = None) -> None:
        self.store = store
        self.policy = policy or CatalogPolicy()
        # Segments are immutable: the versions loaded in this process share them, and one no
        # loaded version references any more is freed with its last version.
        self._segments: weakref.WeakValueDictionary[tuple[str, str], Segment] = weakref.WeakValueDictionary()
        self._tombstones: dict[tuple[str, str], dict[str, list[int]]] = {}
        self._lock = threading.Lock()
        self.bytes_written = 0  # by this object, for the benchmark's "bytes written per change"

    def _put(self, key: str, data: bytes) -> None:
        self.store.put(key, data)
        self.bytes_written += len(data)

    # -- the pointer ---------------------------------------------------------------------------
    def _pointer(self, domain: str) -> str:
        return f"domains/{domain}/CURRENT"

    def head(self, domain: str) -> tuple[str | None, str | None]:
        """(version, tag) of the pointer now; (None, None) before the first version."""
        got = self.store.get_tagged(self._pointer(domain))
        if got is None:
            return None, None
        raw, tag = got
        try:
            return str(json.loads(raw)["version"]), tag
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"domain {domain}: corrupt pointer {self._pointer(domain)}: {exc}") from None

    def current_version(self, domain: str) -> str | None:
        return self.head(domain)[0]

    # -- reading -------------------------------------------------------------------------------
    def manifest(self, domain: str, version: str) -> dict[str, Any]:
        meta = json.loads(self.store.get(f"domains/{domain}/versions/{version}/meta.json"))
        if "segments" not in meta:  # format 1: the version folder is its one segment
            meta = {
                **meta,
                "segments": [{"id": f"legacy:{version}", "count": meta.get("count")}],
                "tombstones": [],
                "kind": "train",
                "train_version": version,
            }
        return meta

    def segment(self, domain: str, sid: str) -> Segment:
        with self._lock:
            seg = self._segments.get((domain, sid))
        if seg is not None:
            return seg
        seg = self._read_segment(domain, sid)
        with self._lock:
            return self._segments.setdefault((domain, sid), seg)

    def _read_segment(self, domain: str, sid: str) -> Segment:
        if sid.startswith("legacy:"):
            legacy = DomainIndex.from_files(
                {n: self.store.get(f"domains/{domain}/versions/{sid[7:]}/{n}") for n in DomainIndex.FILES}
            )
            kind = legacy.meta.get("index_kind", "flat")
            return Segment(sid, legacy.items, legacy.vectors, None if kind == "flat" else legacy.faiss, kind)
        base = f"domains/{domain}/segments/{sid}"
        meta = json.loads(self.store.get(f"{base}/meta.json"))
        items = [Item(**d) for d in json.loads(self.store.get(f"{base}/items.json"))]
        vectors = np.load(io.BytesIO(self.store.get(f"{base}/vectors.npy")), allow_pickle=False)
        index = None
        if meta.get("index"):
            index = faiss.deserialize_index(
                np.frombuffer(self.store.get(f"{base}/index.faiss"), dtype=np.uint8)
            )
        return Segment(sid, items, vectors, index, meta.get("kind", "delta"))

    def tombstones(self, domain: str, tid: str) -> dict[str, list[int]]:
        key = (domain, tid)
        got = self._tombstones.get(key)
        if got is None:
            got = json.loads(self.store.get(f"domains/{domain}/tombstones/{tid}.json"))
            if len(self._tombstones) > 4096:
                self._tombstones.clear()
            self._tombstones[key] = got
        return got

    def assemble(self, domain: str, meta: dict[str, Any]) -> Catalog:
        """The catalog a manifest describes (segments read once per process, then shared)."""
        segments = [self.segment(domain, s["id"]) for s in meta["segments"]]
        alive = [np.ones(len(s), dtype=bool) for s in segments]
        where = {s.sid: i for i, s in enumerate(segments)}
        for tid in meta.get("tombstones", []):
            for sid, rows in self.tombstones(domain, tid).items():
                if sid in where and rows:
                    alive[where[sid]][np.asarray(rows, dtype=np.int64)] = False
        return Catalog(meta, segments, alive, self.policy)

    def load(self, domain: str, version: str) -> Catalog:
        return self.assemble(domain, self.manifest(domain, version))

    def put_image(self, key: str, data: bytes) -> None:
        if not self.store.exists(key):
            self._put(key, data)

    def image(self, key: str) -> bytes:
        return self.store.get(key)

    # -- writing -------------------------------------------------------------------------------
    def write_segment(
        self,
        domain: str,
        items: list[Item],
        vectors: np.ndarray,
        index: faiss.Index | None = None,
        kind: str = "delta",
    ) -> dict[str, Any]:
        """A new immutable segment (``meta.json`` last: a segment without it was never whole)."""
        sid = new_version_id()
        base = f"domains/{domain}/segments/{sid}"
        self._put(f"{base}/items.json", json.dumps([i.to_json() for i in items]).encode())
        self._put(f"{base}/vectors.npy", _npy(vectors))
        if index is not None:
            self._put(f"{base}/index.faiss", faiss.serialize_index(index).tobytes())
        meta = {
            "id": sid,
            "count": len(items),
            "kind": kind,
            "index": index is not None,
            "created_at": now_iso(),
        }
        self._put(f"{base}/meta.json", json.dumps(meta).encode())
        seg = Segment(sid, items, vectors, index, kind)
        with self._lock:
            self._segments[(domain, sid)] = seg
        return {"id": sid, "count": len(items), "kind": kind}

    def write_tombstones(self, domain: str, rows: dict[str, list[int]]) -> str:
        tid = new_version_id()
        data = {sid: sorted(int(r) for r in rs) for sid, rs in rows.items() if rs}
        self._put(f"domains/{domain}/tombstones/{tid}.json", json.dumps(data).encode())
        self._tombstones[(domain, tid)] = data
        return tid

    def new_manifest(
        self,
        domain: str,
        parent: Catalog | None,
        kind: str,
        segments: list[dict],
        tombstones: list[str],
        **extra: Any,
    ) -> tuple[dict[str, Any], Catalog]:
        """A manifest on top of ``parent`` (inheriting what its vectors mean) and its catalog."""
        inherited = {k: v for k, v in (parent.meta if parent else {}).items() if k not in _PER_VERSION}
        meta = {
            **inherited,
            **extra,
            "format": FORMAT,
            "version": new_version_id(),
            "created_at": now_iso(),
            "kind": kind,
            "parent": parent.version if parent else None,
            "segments": segments,
            "tombstones": tombstones,
        }
        catalog = self.assemble(domain, meta)
        meta["count"] = catalog.count
        meta["labels"] = catalog.labels()
        return meta, catalog

    def _write_manifest(self, domain: str, meta: dict[str, Any]) -> None:
        self._put(
            f"domains/{domain}/versions/{meta['version']}/meta.json", json.dumps(meta, indent=1).encode()
        )

    def _swap(self, domain: str, version: str, tag: str | None) -> bool:
        pointer = {"version": version, "updated_at": datetime.now(UTC).isoformat()}
        data = json.dumps(pointer).encode()
        ok = self.store.put_if(self._pointer(domain), data, tag)
        if ok:
            self.bytes_written += len(data)
        return ok

    def _landed(self, domain: str, version: str, created_at: str) -> bool:
        """Whether ``version`` is the head or an ancestor of it: a check after a successful
        compare-and-set, for stores whose conditional write is not atomic (moto's S3 checks, then
        writes); on real S3 and the local store it is true at the first step."""
        current = self.current_version(domain)
        for _ in range(64):
            if current == version:
                return True
            if current is None or current < version:  # older than ours: ours is not behind it
                return False
            current = self.manifest(domain, current).get("parent")
        return False

    def commit(
        self,
        domain: str,
        change: Callable[[Catalog | None], tuple[dict[str, Any], Catalog] | None],
        attempts: int = 40,
        replace_corrupt_pointer: bool = False,
    ) -> Catalog | None:
        """Apply ``change`` to the head and move the pointer to its result, atomically.

        ``change(head)`` returns ``(manifest, catalog)`` (see :meth:`new_manifest`), or None when
        there is nothing to do. When another writer moved the pointer first, ``change`` runs again
        on the new head: the loser re-applies, so no update is lost. Returns the committed catalog.
        """
        for attempt in range(attempts):
            try:
                version, tag = self.head(domain)
            except ValueError:
                if not replace_corrupt_pointer:
                    raise
                got = self.store.get_tagged(self._pointer(domain))
                version, tag = None, got[1] if got else None
                logger.warning("domain %s: replacing a corrupt pointer", domain)
            head = self.load(domain, version) if version else None
            result = change(head)
            if result is None:
                return head
            meta, catalog = result
            self._write_manifest(domain, meta)
            if self._swap(domain, meta["version"], tag) and self._landed(
                domain, meta["version"], meta["created_at"]
            ):
                logger.info(
                    "domain %s now serves version %s (%s, %d items)",
                    domain,
                    meta["version"],
                    meta["kind"],
                    catalog.count,
                )
                return catalog
            logger.info(
                "domain %s: another writer moved the pointer; re-applying (attempt %d)", domain, attempt + 1
            )
            time.sleep(random.uniform(0.005, 0.05) * min(attempt + 1, 8))
        raise WriteLost(f"domain {domain}: could not commit a change after {attempts} attempts")

    def publish(
        self, domain: str, index: DomainIndex, expected_previous: str | None | bool = False
    ) -> Catalog:
        """A training's result as the domain's new version: one base segment (its FAISS index
        unless Flat), then the pointer. Images must already be stored.

        With ``expected_previous`` (the version the training started from, or None), refuse with
        :class:`Conflict` if another *training* published meanwhile, so a slower, older build
        cannot replace a newer one; item uploads and deletes since then are replaced (the archive
        becomes the catalog)."""
        kind = index.meta.get("index_kind", "flat")
        seg = self.write_segment(
            domain, index.items, index.vectors, None if kind == "flat" else index.faiss, "base"
        )
        started_from = None
        if expected_previous not in (False, None):
            try:
                started_from = self.manifest(domain, str(expected_previous)).get(
                    "train_version", expected_previous
                )
            except KeyError:  # garbage-collected meanwhile: compare with the version itself
                started_from = expected_previous

        def change(head: Catalog | None) -> tuple[dict[str, Any], Catalog]:
            if expected_previous is not False:
                now = head.meta.get("train_version", head.version) if head else None
                if now != started_from:
                    raise Conflict(
                        f"domain {domain}: another build published {head.version if head else None} while "
                        f"this one ran (started from {expected_previous}); not replacing it"
                    )
            meta = {k: v for k, v in index.meta.items() if k not in _PER_VERSION}
            built = {
                **meta,
                "format": FORMAT,
                "version": index.version,
                "created_at": index.meta.get("created_at") or now_iso(),
                "kind": "train",
                "parent": head.version if head else None,
                "train_version": index.version,
                "segments": [seg],
                "tombstones": [],
            }
            catalog = self.assemble(domain, built)
            built["count"], built["labels"] = catalog.count, catalog.labels()
            return built, catalog

        catalog = self.commit(domain, change, attempts=10, replace_corrupt_pointer=True)
        assert catalog is not None
        return catalog

    # -- versions ------------------------------------------------------------------------------
    def versions(self, domain: str) -> list[dict[str, Any]]:
        """Every version's manifest, newest first."""
        keys = [k for k in self.store.list(f"domains/{domain}/versions") if k.endswith("/meta.json")]
        out = []
        for key in keys:
            version = key.split("/")[-2]
            try:
                out.append(self.manifest(domain, version))
            except (KeyError, ValueError) as exc:
                logger.warning("domain %s: unreadable manifest %s: %s", domain, key, exc)
        out.sort(key=lambda m: str(m.get("version", "")), reverse=True)  # ids sort by creation time
        return out

    def activate(self, domain: str, version: str) -> Catalog:
        """Serve what ``version`` served, as a new version of kind ``activate`` (history stays linear)."""
        try:
            target = self.manifest(domain, version)
        except KeyError:
            raise UnknownItem(f"domain {domain!r} has no version {version!r}") from None

        def change(head: Catalog | None) -> tuple[dict[str, Any], Catalog]:
            keep = {k: v for k, v in target.items() if k not in _PER_VERSION}
            meta = {
                **keep,
                "format": FORMAT,
                "version": new_version_id(),
                "created_at": now_iso(),
                "kind": "activate",
                "activated_from": version,
                "parent": head.version if head else None,
                "segments": target["segments"],
                "tombstones": target.get("tombstones", []),
            }
            catalog = self.assemble(domain, meta)
            meta["count"], meta["labels"] = catalog.count, catalog.labels()
            return meta, catalog

        catalog = self.commit(domain, change)
        assert catalog is not None
        return catalog

    def collect_garbage(self, domain: str, keep: int, grace_seconds: float = 600.0) -> dict[str, int]:
        """Keep the ``keep`` newest versions and the served one; delete the other manifests, then
        every blob (segment, tombstone, encoder, image) no kept version references. Blobs younger
        than ``grace_seconds`` stay: another replica may be about to reference them."""
        served = self.current_version(domain)
        manifests = self.versions(domain)
        kept = [m for i, m in enumerate(manifests) if i < keep or m["version"] == served]
        dropped = [m for m in manifests if m not in kept]
        removed = {"versions": 0, "segments": 0, "tombstones": 0, "images": 0, "encoders": 0}
        ages = self.store.ages(f"domains/{domain}")
        root = f"domains/{domain}/"
        for m in dropped:
            key = f"{root}versions/{m['version']}/meta.json"
            if ages.get(key, 0.0) >= grace_seconds:
                self.store.delete(key)
                removed["versions"] += 1
            else:
                kept.append(m)
        segs = {s["id"] for m in kept for s in m["segments"]}
        tombs = {t for m in kept for t in m.get("tombstones", [])}
        folders = {m["version"] for m in kept} | {s[7:] for s in segs if s.startswith("legacy:")}
        encoders = {str(m.get("encoder", "")).removeprefix("store:") for m in kept}
        images: set[str] = set()
        for sid in segs:
            images.update(it.image_key for it in self.segment(domain, sid).items)
        for key, age in ages.items():
            if age < grace_seconds or not key.startswith(root):
                continue
            parts = key[len(root) :].split("/")
            if parts[0] == "segments" and len(parts) >= 3 and parts[1] not in segs:
                self.store.delete(key)
                removed["segments"] += parts[-1] == "meta.json"
            elif parts[0] == "tombstones" and parts[-1].removesuffix(".json") not in tombs:
                self.store.delete(key)
                removed["tombstones"] += 1
            elif parts[0] == "images" and key not in images:
                self.store.delete(key)
                removed["images"] += 1
            elif (
                parts[0] == "versions" and len(parts) >= 3 and parts[1] not in folders and key not in encoders
            ):
                self.store.delete(key)
                removed["encoders"] += parts[-1] == "encoder.tar"
        if any(removed.values()):
            logger.info("domain %s: garbage collected %s", domain, removed)
        return removed
