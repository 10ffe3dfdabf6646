"""runners/encoder.py: the export templates are traced once, in the background, when a training
starts (not at start-up, where the tracing slowed the first searches after ready)."""

from __future__ import annotations

import threading


def test_export_templates_are_traced_once_when_asked_and_reported_meanwhile():
    from runners.encoder import EncoderService

    svc = EncoderService.inner.__new__(EncoderService.inner)  # no __init__: no TensorFlow
    release, traced = threading.Event(), []

    class Pool:
        def prepare_export(self, encoder: str, dim: int) -> None:
            release.wait(10)
            traced.append((encoder, dim))

    svc.pool = Pool()
    svc._wanted = [("builtin", 128)]
    svc._templates_ready, svc._templates_lock = threading.Event(), threading.Lock()
    svc._templates_started = False
    svc._templates_ready.set()
    assert svc.prepare_exports() is True
    assert not svc._templates_ready.is_set()  # /stats says the tracing is under way
    assert svc.prepare_exports() is False  # a second training does not trace again
    release.set()
    assert svc._templates_ready.wait(10)
    assert traced == [("builtin", 128)]
