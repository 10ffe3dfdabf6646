"""BentoML 1.4 dependency services: one shared TF encoder, one light FAISS service per domain."""

from simserver.timeouts import keep_connections_alive, release_request_timers

# Every service module imports this package first: each process gets the patches before it serves.
release_request_timers()
keep_connections_alive()

# BentoML's dependency client recycles its HTTP session every 100 requests by default and drops
# the calls in flight when it does (measured: 7-11% HTTP 500s at 16 concurrent clients). Services
# that others depend on set this so the session lives as long as the process.
RUNNER_CONNECTION = {"max_requests": 10**9, "max_age": 1e9}

# Services only the gateway calls: no access log (the gateway logs each request once) and no
# Prometheus middleware (their /metrics is not reachable from outside). Both cost CPU per call.
#
# Nor do their /readyz probe the encoder in turn (`runner_probe`): the gateway probes the encoder
# itself, and a probe chained through them could be left without an answer when the gateway gave
# up on it, a request that then held their exit on SIGTERM until the watchdog below (10 s).
INTERNAL_SERVICE = {
    "logging": {"access": {"enabled": False}},
    "metrics": {"enabled": False},
    "runner_probe": {"enabled": False, "timeout": 1, "period": 10},
}


def exit_after_sigterm(grace_seconds: float = 10.0) -> None:
    """Exit at most ``grace_seconds`` after SIGTERM. Call from a service's ``__init__``.

    A safety net: BentoML gives only the entry service uvicorn's graceful-shutdown timeout, so an
    internal service holding a request that never completes waits for it up to its traffic timeout
    (120 or 900 s) before it exits. That happened with readiness probes chained through them (fixed
    by ``runner_probe`` above: exit now takes under a second); this bounds anything like it.
    uvicorn still drains in-flight requests first.
    """
    import os
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame) -> None:
        timer = threading.Timer(grace_seconds, os._exit, (0,))
        timer.daemon = True
        timer.start()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def die_with_server() -> None:
    """Make this worker exit when the ``bentoml serve`` process that started it dies, even by
    ``kill -9``. Call from every service's ``__init__``.

    BentoML starts each worker in a process group of its own, so a killed server left them all
    running, holding the port (a restart failed with "Address already in use"). Linux only; a
    no-op outside a BentoML worker (in-process tests) and elsewhere.
    """
    import ctypes
    import signal
    import sys

    from bentoml._internal.context import server_context

    if server_context.worker_index is None or not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    # No "parent already gone?" check (getppid() == 1): in a container `bentoml serve` *is* PID 1,
    # and every worker would take itself for an orphan. The window it would close (the server
    # dying between starting this worker and this call) is a few seconds at start-up.
