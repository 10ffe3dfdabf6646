"""runners/trainer.py's per-domain lock: one training per domain at a time, others refused at once."""

from __future__ import annotations

import threading

import pytest

from simserver.domain_config import DomainConfig
from simserver.errors import Conflict, UnknownDomain


def test_one_training_per_domain():
    from runners.trainer import TrainerService

    svc = TrainerService.inner.__new__(TrainerService.inner)  # no __init__: no store, no encoder
    svc.domains = {"a": DomainConfig(name="a"), "b": DomainConfig(name="b")}
    svc._training, svc._lock = set(), threading.Lock()
    assert svc._claim("a").name == "a"
    with pytest.raises(Conflict, match="already training"):
        svc._claim("a")
    assert svc._claim("b").name == "b"  # another domain trains meanwhile
    with pytest.raises(UnknownDomain):
        svc._claim("c")
    svc._training.discard("a")
    assert svc._claim("a").name == "a"


def test_an_encoder_call_on_a_reset_connection_is_made_once_more():
    import aiohttp

    from runners.trainer import once_more_if_reset

    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise aiohttp.ClientOSError(104, "Connection reset by peer")
        return "described"

    assert once_more_if_reset(flaky) == "described" and len(calls) == 2

    def down() -> str:
        raise aiohttp.ServerDisconnectedError()

    with pytest.raises(aiohttp.ServerDisconnectedError):  # twice: the failure is the caller's
        once_more_if_reset(down)
