"""Start-up cleanup of what a crash leaves on local disk.

A process killed mid-write leaves ``.<name>.*.tmp`` files (the store's atomic writes), ``.tmp-*``
folders (encoder unpacking and export in the cache) and version folders without ``meta.json``
(``meta.json`` is written last, so such a folder is an aborted publish and is never loaded).
Measured after a ``kill -9`` during a training: a 15 MB ``.encoder.tar.*.tmp`` in a version folder
with no ``meta.json``, and a 25 MB temporary folder in the cache.

Only what is older than ``older_than_s`` goes: another process on the same folder may be writing
right now, and no single write takes minutes. A version folder without ``meta.json`` waits longer,
``version_older_than_s``: another server's training on the same folder may have exported its encoder
there hours before it publishes (a training may run for the trainer's whole 24 h timeout). On S3 a
put is atomic (no temporary object), and a version without ``meta.json`` is ignored by every reader.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

OLDER_THAN_S = 600.0
VERSION_OLDER_THAN_S = 25 * 3600.0


@dataclass
class Swept:
    files: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    bytes: int = 0


def _age(path: Path, now: float) -> float:
    """Seconds since anything in ``path`` (a file, or a folder's newest entry) last changed."""
    if path.is_file() or path.is_symlink():
        return now - path.lstat().st_mtime
    # The files' times, not the folder's: removing a file inside changes the folder's.
    files = [p.lstat().st_mtime for p in path.rglob("*") if not p.is_dir()]
    return now - max(files, default=path.lstat().st_mtime)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _remove(path: Path, swept: Swept) -> None:
    size = _size(path)
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            swept.folders.append(str(path))
        else:
            path.unlink()
            swept.files.append(str(path))
    except FileNotFoundError:  # another replica's sweep got there first
        return
    swept.bytes += size


def sweep(
    store_root: Path | None,
    cache_dir: Path | None,
    older_than_s: float = OLDER_THAN_S,
    now: float | None = None,
    version_older_than_s: float = VERSION_OLDER_THAN_S,
) -> Swept:
    """Remove crash leftovers under a local store root and a cache folder (either may be None)."""
    now = time.time() if now is None else now
    swept = Swept()
    if store_root is not None:  # first: removing a temp file inside would make the folder look new
        for folder in store_root.glob("domains/*/versions/*"):
            aborted = folder.is_dir() and not (folder / "meta.json").exists()
            if aborted and _age(folder, now) > version_older_than_s:
                _remove(folder, swept)
    for root in (r for r in (store_root, cache_dir) if r is not None and r.is_dir()):
        for tmp in [p for p in root.rglob(".*.tmp") if p.is_file()]:
            if _age(tmp, now) > older_than_s:
                _remove(tmp, swept)
        for tmp in [p for p in root.rglob(".tmp-*") if p.is_dir()]:
            if _age(tmp, now) > older_than_s:
                _remove(tmp, swept)
    if swept.files or swept.folders:
        logger.info(
            "removed %d files and %d folders left by an interrupted write (%d bytes)",
            len(swept.files),
            len(swept.folders),
            swept.bytes,
        )
    return swept
