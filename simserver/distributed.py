"""Distributed domain builds on Ray Data: decode and encode in parallel actors, Parquet shards in
the artifact store, then the index and the version published as any training publishes one.

The driver lists the source (a local folder or ``s3://bucket/prefix``; the ``<label>/<image>``
layout and ``metadata.csv`` of :func:`simserver.ingest.layout`) and cuts the images, in path
order, into shards of ``shard_size``. Each shard is one row of a Ray Dataset mapped by an actor
pool (one actor per CPU, each loading the domain's encoder on the server's runtime with one
TFLite thread); an actor reads the shard's images, skips and lists the ones that do not decode
(never failing the job, unlike an upload, where an oversized image refuses the archive), stores
the images (content-addressed, as every build does), and writes
``domains/<d>/builds/<build>/shards/<k>.parquet`` (vectors + item metadata, its skipped images in
the file's metadata) with one atomic put. ``<build>`` hashes the domain, source, listing, encoder
and shard size, so a re-run of the same build finds the shards already written and encodes only
the rest. The driver then reads the shards and hands them to :func:`simserver.training.train_domain`
with the features given (``mode=pretrained``: fine-tuning needs the pixels in one process), which
evaluates, calibrates, builds the index and moves the pointer last: a normal version.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from simserver.builder import BuildReport, prefetched
from simserver.domain_config import DomainConfig
from simserver.errors import BadArchive, BadImage, RequestRefused, TooLarge
from simserver.ingest import (
    Dataset,
    Sample,
    _parse_metadata,
    _sample,
    _visible,
    check_unique_ids,
    iter_chunks,
    layout,
    metadata_finder,
)
from simserver.repository import Repository, image_key
from simserver.schemas import Skipped
from simserver.store import ArtifactStore, LocalStore, open_store

logger = logging.getLogger(__name__)

SHARD_SIZE = 500
# What the actors need of the driver's environment: where the built-in encoder is, S3's endpoint,
# region and credentials (a cluster's nodes normally have an instance role: leave those unset).
FORWARDED_ENV = ("BENTOML_HOME", "TF_CPP_MIN_LOG_LEVEL", "BUILTIN_MODEL", "ENCODER_RUNTIME")


def open_source(uri: str) -> ArtifactStore:
    """The images to build from: ``s3://bucket/prefix`` or a local folder, read as a store."""
    if uri.startswith("s3://"):
        return open_store(uri.rstrip("/"))
    if not Path(uri).is_dir():
        raise BadArchive(f"{uri} is not a folder (give a folder or s3://bucket/prefix/)")
    return LocalStore(uri)


@dataclass
class Plan:
    """A source's images in build order: (row, source key, name, label, metadata, item id)."""

    images: list[tuple[int, str, str, str, dict[str, str], str]]
    skipped: list[Skipped]
    digest: str  # of the listing and metadata: a changed source is a new build


def plan_source(source: ArtifactStore) -> Plan:
    keys = [k for k in source.list("") if _visible(PurePosixPath(k).parts)]
    listed = sorted((PurePosixPath(k).parts, k) for k in keys)  # path order, as read_folder reads
    metadata_key, images, skipped = layout(listed)
    raw = source.get(metadata_key) if metadata_key else b""
    find = metadata_finder(_parse_metadata(raw) if raw else {}, [rel for rel, _ in images])
    rows = []
    for row, (rel, key) in enumerate(images):
        meta, item_id = find(rel)
        rows.append((row, key, "/".join(rel), rel[0], meta, item_id or "/".join(rel)))
    if not rows:
        raise BadArchive(f"no image in {source.uri}: expected <category>/<image> objects")
    digest = hashlib.sha256(json.dumps([keys, hashlib.sha256(raw).hexdigest()]).encode()).hexdigest()
    return Plan(rows, skipped, digest)


def configured_encoder_id(encoder: str, builtin_model: str) -> str:
    """The id an actor's loaded encoder will have, without loading TensorFlow here."""
    from simserver.encoder import BUILTIN, builtin_model_path

    return builtin_model_path(builtin_model)[0] if encoder == BUILTIN else encoder


def shard_prefix(domain: str, build: str) -> str:
    return f"domains/{domain}/builds/{build}/shards/"


def prune_builds(store: ArtifactStore, domain: str, keep: str) -> int:
    """Delete the shards of ``domain``'s builds other than ``keep`` (called once ``keep`` is
    published): a build's shards are what a re-run of it resumes from, so the latest is kept and
    the older ones are garbage. Returns the number of objects deleted."""
    root = f"domains/{domain}/builds/"
    stale = [key for key in store.list(root) if not key.startswith(f"{root}{keep}/")]
    for key in stale:
        store.delete(key)
    return len(stale)


class ShardEncoder:
    """A Ray Data actor: one encoder, loaded once; each call encodes the shards of its batch."""

    def __init__(self, job: dict[str, Any]) -> None:
        os.environ.update(job["env"])

        self.job = job
        self.source = open_source(job["source"])
        self.repo = Repository(open_store(job["store"]))
        self.encoder = job_encoder(job)
        if self.encoder.id != job["encoder_id"]:
            raise RuntimeError(
                f"this node's encoder is {self.encoder.id}, the build's {job['encoder_id']}: "
                "every node must run the same image"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        counts = [
            self.encode_shard(int(k), str(e)) for k, e in zip(batch["shard"], batch["entries"], strict=True)
        ]
        return {
            "shard": np.asarray(batch["shard"]),
            "indexed": np.asarray([c[0] for c in counts]),
            "skipped": np.asarray([c[1] for c in counts]),
        }

    def _decode(self, rows: list[list]) -> tuple[list[tuple[list, Sample]], np.ndarray, list[Skipped]]:
        limits, size = self.job["limits"], self.job["image_size"]
        kept, pixels, skipped = [], [], []
        for row in rows:
            _, key, name, label, meta, item_id = row
            try:
                sample = _sample(name, label, self.source.get(key), limits, size, meta, item_id)
                pixels.append(sample.pixels)
            except KeyError:
                skipped.append(Skipped(name=name, reason="gone from the source while the build ran"))
            except (BadImage, TooLarge) as exc:  # one image never fails a build of millions
                skipped.append(Skipped(name=name, reason=exc.message.removeprefix(f"{name}: ")))
            else:
                kept.append((row, sample))
        empty = np.zeros((0, size, size, 3), np.uint8)
        return kept, np.stack(pixels) if pixels else empty, skipped

    def encode_shard(self, shard: int, entries: str) -> tuple[int, int]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        domain = self.job["domain"]
        batches = list(iter_chunks(json.loads(entries), self.job["batch"]))
        kept: list[tuple[list, Sample]] = []
        vectors: list[np.ndarray] = []
        skipped: list[Skipped] = []
        for _, (ok, pixels, bad) in prefetched(batches, self._decode):  # decode overlaps encoding
            if ok:
                vectors.append(np.asarray(self.encoder.encode(pixels), np.float32))
            kept += ok
            skipped += bad
        keys = []
        for _, s in kept:
            keys.append(image_key(domain, s.data, s.media_type))
            self.repo.put_image(keys[-1], s.data)
        dim = self.encoder.dim
        flat = np.concatenate(vectors).ravel() if vectors else np.zeros(0, np.float32)
        table = pa.table(
            {
                "row": pa.array([r[0] for r, _ in kept], pa.int64()),
                "id": [s.id for _, s in kept],
                "name": [s.name for _, s in kept],
                "label": [s.label for _, s in kept],
                "image_key": keys,
                "media_type": [s.media_type for _, s in kept],
                "metadata": [json.dumps(s.metadata) for _, s in kept],
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim),
            }
        ).replace_schema_metadata(
            {
                "encoder_id": self.encoder.id,
                "skipped": json.dumps([s.model_dump() for s in skipped]),
            }
        )
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.repo.store.put(f"{self.job['prefix']}{shard:06d}.parquet", buf.getvalue())
        return len(kept), len(skipped)


def job_encoder(job: dict[str, Any]) -> Any:
    """The build's encoder as an actor runs it (one TFLite thread: Ray places one actor per CPU).
    The built-in one starts without TensorFlow: its shipped conversion, checked against the
    SavedModel's shipped vectors (:mod:`simserver.encoder`)."""
    from simserver.encoder_pool import EncoderPool

    pool = EncoderPool(
        builtin_model=job["builtin_model"], runtime=job["runtime"], threads=1, batch_size=job["batch"]
    )
    return pool.get(job["encoder"])


class ShardBackend:
    """The training backend of a distributed build: the features are the shards' vectors. The
    few images the training still encodes itself (the duplicate calibration's synthetic copies)
    are encoded here, on the driver, by the encoder the actors run."""

    def __init__(self, encoder: str, encoder_id: str, job: dict[str, Any] | None = None) -> None:
        self.encoder, self.encoder_id = encoder, encoder_id
        self._job = job
        self._local: Any = None

    def encode(self, images: np.ndarray) -> np.ndarray:
        if self._job is None:
            raise RuntimeError("a distributed build encodes in its actors")
        if self._local is None:
            self._local = job_encoder(self._job)
        return np.asarray(self._local.encode(images), np.float32)

    def encode_text(self, texts: list[str], encoder: str) -> np.ndarray:
        """Titles for the fusion weights a training learns (a capped number): on the driver."""
        from simserver.text_encoder import shared_pool

        return shared_pool().get(encoder).encode(texts)

    def train_head(self, *args: Any) -> Any:
        raise RuntimeError("a distributed build indexes with the pretrained encoder")

    export = train_head


def read_shards(store: ArtifactStore, keys: list[str], encoder_id: str) -> tuple[Any, list[Skipped]]:
    """The shards' rows as one Arrow table in build order, and every image they skipped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables, skipped = [], []
    for key in keys:
        table = pq.read_table(io.BytesIO(store.get(key)))
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if meta.get("encoder_id") != encoder_id:
            raise RuntimeError(f"{key} was encoded by {meta.get('encoder_id')}, not {encoder_id}")
        skipped += [Skipped(**s) for s in json.loads(meta.get("skipped", "[]"))]
        tables.append(table.replace_schema_metadata(None))
    return pa.concat_tables(tables).sort_by("row"), skipped


def shards_dataset(cfg: DomainConfig, table: Any, skipped: list[Skipped], image_size: int) -> Dataset:
    """The shards' items as a :class:`Dataset` whose images are already in the store."""
    columns = {
        name: table.column(name).to_pylist() for name in ("id", "name", "label", "image_key", "media_type")
    }
    metadata = table.column("metadata").to_pylist()
    samples = [
        Sample(
            columns["name"][i],
            columns["label"][i],
            b"",
            columns["media_type"][i],
            json.loads(metadata[i]),
            image_size,
            cfg.limits.max_image_pixels,
            cfg.limits.max_decoded_bytes,
            columns["id"][i],
            columns["image_key"][i],
        )
        for i in range(table.num_rows)
    ]
    check_unique_ids(samples)
    return Dataset(samples, sorted(skipped, key=lambda s: s.name))


def _vectors(table: Any) -> np.ndarray:
    column = table.column("vector").combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)


@dataclass
class RayOptions:
    address: str | None = None  # an existing cluster ("auto", "ray://…", host:port); None: start one here
    workers: int | None = None  # actors; None: one per CPU of the cluster
    shard_size: int = SHARD_SIZE
    batch_size: int = 32


def start_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Joins ``address`` or starts a local Ray (``num_cpus``: default the machine's), unless this
    process already has one (tests share one per session); True if this call started it. Ray gives
    a new node a fixed 30 s to register: on a loaded machine it may miss that once, so one retry."""
    import ray

    if ray.is_initialized():
        return False
    for attempt in (1, 2):
        try:
            ray.init(
                address=address,
                num_cpus=None if address else num_cpus,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
            return True
        except Exception as exc:
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise
            logger.warning("Ray did not start in time (%s); trying once more", exc)
            ray.shutdown()
    return True


def build_on_ray(
    repo: Repository,
    cfg: DomainConfig,
    source_uri: str,
    store_uri: str,
    options: RayOptions | None = None,
    progress: Callable[[int], None] | None = None,
) -> BuildReport:
    """Build and publish ``cfg.name`` from ``source_uri`` on Ray (see the module docstring);
    ``progress(n)``: n more images done (a shard finished, or found written by an earlier run)."""
    from simserver.settings import get_settings

    options = options or RayOptions()
    settings = get_settings()
    t0 = time.perf_counter()
    plan = plan_source(open_source(source_uri))
    encoder_id = configured_encoder_id(cfg.encoder, settings.builtin_model)
    image_size = 224
    build = hashlib.sha256(
        json.dumps(
            [cfg.name, source_uri.rstrip("/"), plan.digest, encoder_id, image_size, options.shard_size]
        ).encode()
    ).hexdigest()[:16]
    prefix = shard_prefix(cfg.name, build)
    shards = list(iter_chunks(plan.images, options.shard_size))
    keys = [f"{prefix}{k:06d}.parquet" for k in range(len(shards))]
    written = set(repo.store.list(prefix))
    todo = [k for k, key in enumerate(keys) if key not in written]
    if progress and len(todo) < len(shards):
        progress(sum(len(shards[k]) for k in range(len(shards)) if keys[k] in written))
    logger.info(
        "domain %s: build %s, %d images in %d shards, %d already written",
        cfg.name,
        build,
        len(plan.images),
        len(shards),
        len(shards) - len(todo),
    )
    t_encode = time.perf_counter()
    job = {
        "domain": cfg.name,
        "source": source_uri,
        "store": store_uri,
        "prefix": prefix,
        "encoder": cfg.encoder,
        "encoder_id": encoder_id,
        "builtin_model": settings.builtin_model,
        "runtime": settings.encoder_runtime,
        "image_size": image_size,
        "limits": cfg.limits,
        "batch": options.batch_size,
        "env": {k: v for k, v in os.environ.items() if k in FORWARDED_ENV or k.startswith("AWS_")},
    }
    if todo:
        _run_actors(job, [(k, shards[k]) for k in todo], options, progress)
    encode_seconds = time.perf_counter() - t_encode
    table, skipped = read_shards(repo.store, keys, encoder_id)
    if table.num_rows == 0:
        raise RequestRefused(f"no usable image in {source_uri}; {len(skipped)} skipped")
    dataset = shards_dataset(cfg, table, plan.skipped + skipped, image_size)
    from simserver.training import train_domain

    report = train_domain(
        repo,
        cfg,
        dataset,
        ShardBackend(cfg.encoder, encoder_id, job),
        mode="pretrained",
        features=_vectors(table),
        started=t0,
    )
    report.meta["build"] = {
        "engine": "ray",
        "id": build,
        "shards": len(shards),
        "resumed": len(shards) - len(todo),
        "encode_seconds": round(encode_seconds, 3),
        "pruned": prune_builds(repo.store, cfg.name, build),
    }
    logger.info("domain %s: encoded %d shards in %.1f s", cfg.name, len(todo), encode_seconds)
    return report


def _run_actors(
    job: dict[str, Any],
    shards: list[tuple[int, list]],
    options: RayOptions,
    progress: Callable[[int], None] | None,
) -> None:
    import ray

    started = start_ray(options.address)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the CLI draws its own
        workers = options.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        workers = min(workers, len(shards))
        rows = [{"shard": k, "entries": json.dumps(entries)} for k, entries in shards]
        sizes = {k: len(entries) for k, entries in shards}
        ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            ShardEncoder,
            fn_constructor_kwargs={"job": job},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=1,
        )
        for row in ds.iter_rows():
            if progress:
                progress(sizes[int(row["shard"])])
    finally:
        if started:
            ray.shutdown()
