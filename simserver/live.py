"""The version a worker serves: loaded from the store, swapped when the domain's pointer moves.

Each worker polls the pointer (``POINTER_POLL_SECONDS``), so every worker and every replica picks
up a new version without a restart; a swap is one reference assignment, so in-flight searches
finish on the version they started with.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from simserver.catalog import Catalog
from simserver.repository import Repository

logger = logging.getLogger(__name__)


class LiveIndex:
    """``warm``: called with a newly loaded version before it replaces the served one (not for the
    first version: the service's readiness waits for that). Searches meanwhile keep the old one,
    so a replica that picks up a fine-tuned version never makes a client wait for its encoder; a
    warm-up that fails is logged, and the version is served anyway."""

    def __init__(
        self,
        repo: Repository,
        domain: str,
        poll_seconds: float = 2.0,
        warm: Callable[[Catalog], None] | None = None,
    ) -> None:
        self.repo = repo
        self.warm = warm
        self.domain = domain
        self.poll_seconds = poll_seconds
        self.current: Catalog | None = None
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> bool:
        """Load the pointer's version if it is not the one served; True if it swapped."""
        with self._lock:
            try:
                version = self.repo.current_version(self.domain)
                if version is None or (self.current and self.current.version == version):
                    self.last_error = None
                    return False
                index = self.repo.load(self.domain, version)
            except Exception as exc:  # keep serving what we have; say why in /domains
                self.last_error = f"{type(exc).__name__}: {exc}"
                logger.warning("domain %s: cannot refresh: %s", self.domain, self.last_error)
                return False
            if self.warm is not None and self.current is not None:
                try:
                    self.warm(index)
                except Exception as exc:
                    logger.warning("domain %s: warm-up of version %s failed: %s", self.domain, version, exc)
            old = self.current.version if self.current else None
            self.current = index
            self.last_error = None
            logger.info("domain %s: serving version %s (was %s)", self.domain, version, old)
            return True

    def start(self) -> None:
        self.refresh()
        self._thread = threading.Thread(target=self._loop, name=f"poll-{self.domain}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.refresh()

    def stop(self) -> None:
        self._stop.set()
