"""Artifact store: one small interface over a local folder (default) or, later, S3.

Keys are ``/``-separated relative paths. ``put`` is atomic: readers see the old bytes or the new
bytes, never a half-written file. Versions are immutable and the per-domain pointer is written
last, so a crash mid-publish leaves the previous version serving.
"""

from __future__ import annotations

import logging
import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

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


class LocalStore(ArtifactStore):
    def __init__(self, root: str | Path) -> None:
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
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
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
            if p.is_file() and not p.name.endswith(".tmp")
        )


def open_store(uri: str) -> ArtifactStore:
    """``file://relative/or/absolute`` or a bare path -> :class:`LocalStore`."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = (parsed.netloc + parsed.path) if parsed.scheme else uri
        return LocalStore(path)
    raise ValueError(f"unsupported STORE_URI scheme {parsed.scheme!r} (use file://PATH)")
