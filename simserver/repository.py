"""Domain versions in an artifact store.

Layout under the store root::

    domains/<domain>/CURRENT                     pointer: {"version": ...}, written last
    domains/<domain>/versions/<version>/...      immutable index folder (see simserver.index)
    domains/<domain>/images/<sha256>.<ext>       content-addressed images, shared by versions
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from datetime import UTC, datetime

from simserver.errors import Conflict
from simserver.index import DomainIndex
from simserver.store import ArtifactStore

logger = logging.getLogger(__name__)

_EXT = {
    "image/jpeg": "jpg",
    "image/png": "png",
    "image/webp": "webp",
    "image/gif": "gif",
    "image/bmp": "bmp",
    "image/tiff": "tiff",
}


def new_version_id() -> str:
    """Sortable and unique even when two builds finish in the same second."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


def image_key(domain: str, data: bytes, media_type: str) -> str:
    digest = hashlib.sha256(data).hexdigest()
    return f"domains/{domain}/images/{digest}.{_EXT.get(media_type, 'bin')}"


class Repository:
    def __init__(self, store: ArtifactStore) -> None:
        self.store = store

    def _pointer(self, domain: str) -> str:
        return f"domains/{domain}/CURRENT"

    def current_version(self, domain: str) -> str | None:
        try:
            raw = self.store.get(self._pointer(domain))
        except KeyError:
            return None
        try:
            return str(json.loads(raw)["version"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"domain {domain}: corrupt pointer {self._pointer(domain)}: {exc}") from None

    def load(self, domain: str, version: str) -> DomainIndex:
        base = f"domains/{domain}/versions/{version}"
        return DomainIndex.from_files({n: self.store.get(f"{base}/{n}") for n in DomainIndex.FILES})

    def put_image(self, key: str, data: bytes) -> None:
        if not self.store.exists(key):
            self.store.put(key, data)

    def image(self, key: str) -> bytes:
        return self.store.get(key)

    def publish(self, domain: str, index: DomainIndex, expected_previous: str | None | bool = False) -> None:
        """Write the version folder, then point the domain at it. Images must already be stored.

        With ``expected_previous`` (a version or None), refuse with :class:`Conflict` if another
        build moved the pointer meanwhile, so a slower, older build cannot replace a newer one.
        The check narrows the race to the pointer write itself; it is not a distributed lock.
        """
        if expected_previous is not False:
            current = self.current_version(domain)
            if current != expected_previous:
                raise Conflict(
                    f"domain {domain}: another build published {current} while this one "
                    f"ran (started from {expected_previous}); not replacing it"
                )
        base = f"domains/{domain}/versions/{index.version}"
        files = index.to_files()
        # meta.json last: a version folder without it is an aborted write, never loaded.
        for name in sorted(files, key=lambda n: n == "meta.json"):
            self.store.put(f"{base}/{name}", files[name])
        pointer = {"version": index.version, "updated_at": datetime.now(UTC).isoformat()}
        self.store.put(self._pointer(domain), json.dumps(pointer).encode())
        logger.info("domain %s now serves version %s (%d items)", domain, index.version, len(index))
