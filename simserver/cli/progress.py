"""A training's progress on stderr: one tqdm bar per stage (``simserver train`` while it waits)."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any

from simserver.schemas import TrainProgress


class StageBars:
    """``update(progress)`` after each poll: a new bar when the stage changes, its count and ETA."""

    def __init__(self, domain: str, enabled: bool = True) -> None:
        self.domain, self.enabled = domain, enabled
        self.stage: str | None = None
        self.bar: Any = None

    def update(self, p: TrainProgress) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if p.stage != self.stage:
            self.close()
            self.stage = p.stage
            self.bar = tqdm(
                total=p.total or None, desc=f"{self.domain}: {p.stage}", unit="img", file=sys.stderr
            )
        if p.total and self.bar.total != p.total:
            self.bar.total = p.total
        self.bar.n = p.done
        self.bar.set_postfix_str(
            f"{p.seconds:.0f} s" + (f", stage ETA {p.eta_seconds:.0f} s" if p.eta_seconds else ""),
            refresh=False,
        )
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> StageBars:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
