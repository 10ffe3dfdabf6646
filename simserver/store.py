"""Artifact store: one small interface over a local folder (default) or, later, S3.

Keys are ``/``-separated relative paths. ``put`` is atomic: readers see the old bytes or the new
bytes, never a half-written file. Versions are immutable and the per-domain pointer is written
last, so a crash mid-publish leaves the previous version serving.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

logger = logging.getLogger(__name__)


def _check_key(key: str) -> str:
    p = PurePosixPath(key)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ValueError(f"invalid store key {key!r}")
    return str(p)


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk (POSIX); best effort elsewhere.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ArtifactStore(ABC):
    uri: str

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Bytes at ``key``; ``KeyError`` if absent."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Atomically write ``data`` at ``key``."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (recursive), sorted."""

    @abstractmethod
    def get_tagged(self, key: str) -> tuple[bytes, str] | None:
        """Bytes at ``key`` and a tag that changes whenever they do (S3: the ETag); None if absent."""

    @abstractmethod
    def put_if(self, key: str, data: bytes, tag: str | None) -> bool:
        """Compare-and-set: write ``data`` only if ``key`` still has ``tag`` (``None``: only if
        ``key`` does not exist). False, writing nothing, if another writer got there first."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` (no error if absent)."""

    @abstractmethod
    def ages(self, prefix: str) -> dict[str, float]:
        """Seconds since each key under ``prefix`` was last written."""


class LocalStore(ArtifactStore):
    """``durable=False`` skips the fsyncs: for caches, where a write lost in a crash is simply
    recomputed (the rename still makes each write atomic)."""

    def __init__(self, root: str | Path, durable: bool = True) -> None:
        self.durable = durable
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyError(key) from None

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if self.durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            if self.durable:
                _fsync_dir(path.parent)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.exists():
            return []
        return sorted(
            str(p.relative_to(self.root).as_posix())
            for p in base.rglob("*")
            if p.is_file() and not p.name.endswith((".tmp", ".lock"))
        )

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """An exclusive ``flock`` on ``.<name>.lock`` beside ``key``: compare-and-set between the
        processes (and replicas) sharing this folder on one machine."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def get_tagged(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self.get(key)
        except KeyError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def put_if(self, key: str, data: bytes, tag: str | None) -> bool:
        with self._locked(key):
            now = self.get_tagged(key)
            if (now[1] if now else None) != tag:
                return False
            self.put(key, data)
            return True

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def ages(self, prefix: str) -> dict[str, float]:
        now = time.time()
        out = {}
        for key in self.list(prefix):
            try:
                out[key] = now - self._path(key).stat().st_mtime
            except FileNotFoundError:
                pass
        return out


class S3Store(ArtifactStore):
    """``s3://bucket/prefix`` through boto3's standard configuration (credentials chain, region,
    ``AWS_ENDPOINT_URL`` for S3-compatible servers). A single PUT is atomic in S3, and versions
    are immutable, so the pointer written last is the whole publish protocol."""

    def __init__(self, bucket: str, prefix: str = "", client=None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        # Short timeouts and few retries: an unreachable store must not stall the pointer poller.
        self.client = client or boto3.client(
            "s3",
            config=Config(
                connect_timeout=3, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"}
            ),
        )

    def _key(self, key: str) -> str:
        key = _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @staticmethod
    def _missing(exc: Exception) -> bool:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        return code in ("NoSuchKey", "404", "NotFound")

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as exc:
            if self._missing(exc):
                raise KeyError(key) from None
            raise

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if self._missing(exc):
                return False
            raise

    def _objects(self, prefix: str) -> Iterator[dict]:
        full = self._key(prefix) if prefix else self.prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                yield {**obj, "Key": obj["Key"][strip:]}

    def list(self, prefix: str) -> list[str]:
        return sorted(obj["Key"] for obj in self._objects(prefix))

    def get_tagged(self, key: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if self._missing(exc):
                return None
            raise
        return obj["Body"].read(), obj["ETag"]

    def put_if(self, key: str, data: bytes, tag: str | None) -> bool:
        """S3 conditional writes (``If-Match`` / ``If-None-Match: *``, S3 since 2024): the store
        itself refuses the loser with 412 (or 409 when two conditional writes overlap)."""
        from botocore.exceptions import ClientError

        condition = {"IfMatch": tag} if tag is not None else {"IfNoneMatch": "*"}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return False
            if tag is not None and self._missing(exc):  # deleted meanwhile: not ours to recreate
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def ages(self, prefix: str) -> dict[str, float]:
        now = time.time()
        return {obj["Key"]: now - obj["LastModified"].timestamp() for obj in self._objects(prefix)}


class CachedStore(ArtifactStore):
    """Keeps local copies of immutable objects (index versions, content-addressed images), so a
    replica re-reads nothing it has seen and image downloads do not each cost an S3 GET."""

    IMMUTABLE = ("/versions/", "/images/", "/segments/", "/tombstones/")

    def __init__(self, inner: ArtifactStore, cache_dir: str | Path) -> None:
        self.inner = inner
        self.cache = LocalStore(cache_dir)
        self.uri = inner.uri

    def _immutable(self, key: str) -> bool:
        return any(part in f"/{key}" for part in self.IMMUTABLE)

    def get(self, key: str) -> bytes:
        if self._immutable(key):
            try:
                return self.cache.get(key)
            except KeyError:
                data = self.inner.get(key)
                self.cache.put(key, data)
                return data
        return self.inner.get(key)

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, data)
        if self._immutable(key):
            self.cache.put(key, data)

    def exists(self, key: str) -> bool:
        return (self._immutable(key) and self.cache.exists(key)) or self.inner.exists(key)

    def list(self, prefix: str) -> list[str]:
        return self.inner.list(prefix)

    def get_tagged(self, key: str) -> tuple[bytes, str] | None:
        return self.inner.get_tagged(key)

    def put_if(self, key: str, data: bytes, tag: str | None) -> bool:
        return self.inner.put_if(key, data, tag)

    def delete(self, key: str) -> None:
        self.inner.delete(key)
        if self._immutable(key):
            self.cache.delete(key)

    def ages(self, prefix: str) -> dict[str, float]:
        return self.inner.ages(prefix)


def open_store(uri: str, cache_dir: str | Path | None = None) -> ArtifactStore:
    """``file://relative/or/absolute`` or a bare path -> :class:`LocalStore`;
    ``s3://bucket[/prefix]`` -> :class:`S3Store` (behind a :class:`CachedStore` if ``cache_dir``)."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"STORE_URI {uri!r} names no bucket")
        s3 = S3Store(bucket, prefix)
        if cache_dir is None:
            return s3
        # One cache folder per store URI, so two stores never mix their objects.
        return CachedStore(s3, Path(cache_dir) / f"{bucket}-{prefix.strip('/').replace('/', '-')}")
    if uri.startswith("file://"):
        # Not urlparse: a '#' or '?' in a folder name is part of the path here.
        return LocalStore(uri.removeprefix("file://"))
    if "://" in uri:
        raise ValueError(f"unsupported STORE_URI scheme in {uri!r} (use file://PATH or s3://bucket/prefix)")
    return LocalStore(uri)
