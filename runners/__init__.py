"""BentoML 1.4 dependency services: one shared TF encoder, one light FAISS service per domain."""

# BentoML's dependency client recycles its HTTP session every 100 requests by default and drops
# the calls in flight when it does (measured: 7-11% HTTP 500s at 16 concurrent clients). Services
# that others depend on set this so the session lives as long as the process.
RUNNER_CONNECTION = {"max_requests": 10**9, "max_age": 1e9}

# Services only the gateway calls: no access log (the gateway logs each request once) and no
# Prometheus middleware (their /metrics is not reachable from outside). Both cost CPU per call.
INTERNAL_SERVICE = {"logging": {"access": {"enabled": False}}, "metrics": {"enabled": False}}
