"""Prometheus metrics of the gateway, one registry per app.

Invariant: labels are bounded (model alias, version, status class), never a
client-chosen string, so a hostile client cannot blow up the series count.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("agentloop_requests", "Chat completion requests.",
                                ["model", "version", "status"], registry=self.registry)
        self.latency = Histogram("agentloop_request_latency_seconds", "Time to the last byte.",
                                 ["model", "version"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("agentloop_time_to_first_token_seconds", "Time to the first streamed chunk.",
                              ["model", "version"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("agentloop_tokens", "Tokens processed.", ["model", "version", "kind"],
                              registry=self.registry)
        self.inflight = Gauge("agentloop_inflight_requests", "Requests in flight.", registry=self.registry)
        self.engines_ready = Gauge("agentloop_engines_ready", "Engines ready to serve.", registry=self.registry)
        self.log_pending = Gauge("agentloop_log_pending", "Request-log rows waiting to be written.",
                                 registry=self.registry)
        self.log_dead_letters = Gauge("agentloop_log_dead_letters", "Request-log rows whose write failed, "
                                      "kept and retried (the database was down or busy).", registry=self.registry)
        self.log_dropped = Gauge("agentloop_log_dropped_rows", "Request-log rows given up since start: dead "
                                 "letters beyond the writer's bound.", registry=self.registry)

    def observe(self, *, model: str, version: str, status: int, latency: float, ttft: float | None,
                usage: dict | None) -> None:
        self.requests.labels(model, version, str(status)).inc()
        self.latency.labels(model, version).observe(latency)
        if ttft is not None:
            self.ttft.labels(model, version).observe(ttft)
        if usage:
            self.tokens.labels(model, version, "prompt").inc(usage.get("prompt_tokens") or 0)
            self.tokens.labels(model, version, "completion").inc(usage.get("completion_tokens") or 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
