"""BentoML 1.4 dependency services: one shared TF encoder, one light FAISS service per domain."""

# BentoML's dependency client recycles its HTTP session every 100 requests by default and drops
# the calls in flight when it does (measured: 7-11% HTTP 500s at 16 concurrent clients). Services
# that others depend on set this so the session lives as long as the process.
RUNNER_CONNECTION = {"max_requests": 10**9, "max_age": 1e9}

# Services only the gateway calls: no access log (the gateway logs each request once) and no
# Prometheus middleware (their /metrics is not reachable from outside). Both cost CPU per call.
INTERNAL_SERVICE = {"logging": {"access": {"enabled": False}}, "metrics": {"enabled": False}}


def exit_after_sigterm(grace_seconds: float = 10.0) -> None:
    """Exit at most ``grace_seconds`` after SIGTERM. Call from a service's ``__init__``.

    BentoML gives only the entry service uvicorn's graceful-shutdown timeout; a service that is
    itself a dependency client kept waiting for its connections after SIGTERM and never exited
    (measured: an idle trainer and index services outlived their server, orphaned). uvicorn still
    drains in-flight requests first; this only bounds how long it may take.
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
