"""Prometheus metrics for one app: requests by endpoint and status, latency, time to first token, tokens, queue
depth and per-key usage. Each app owns its registry (two servers in one process never mix counts).

MetricsMiddleware times every HTTP exchange to its last body byte, so a streamed reply counts its whole duration.
Key labels are key ids (names or hash prefixes), never keys. Must not decide anything; it only counts.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Paths worth their own label; anything else is "other" (a scanner cannot blow up the label set).
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/ready", "/metrics", "/",
             "/admin/kill-switch", "/admin/usage", "/api/chat", "/api/generate", "/api/tags", "/api/show", "/api/ps",
             "/api/version")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)


class Metrics:
    def __init__(self, engine=None, kill_switch=None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lmforge_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("lmforge_request_duration_seconds", "time from request to last byte",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "time from request to first generated token",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "prompt tokens admitted", ["model"], registry=r)
        self.generated_tokens = Counter("lmforge_generated_tokens", "tokens generated", ["model"], registry=r)
        self.key_requests = Counter("lmforge_key_requests", "admitted requests per API key", ["key"], registry=r)
        self.key_tokens = Counter("lmforge_key_tokens", "tokens per API key", ["key", "kind"], registry=r)
        if engine is not None:
            Gauge("lmforge_queue_depth", "sequences waiting for a generation slot", registry=r
                  ).set_function(lambda: engine.queued)
            Gauge("lmforge_running_sequences", "sequences being generated", registry=r
                  ).set_function(lambda: engine.running)
            Gauge("lmforge_generation_slots", "sequences that can be generated together", registry=r
                  ).set_function(lambda: engine.slots)
        if kill_switch is not None:
            Gauge("lmforge_degraded", "1 while the kill switch is on", registry=r
                  ).set_function(lambda: float(kill_switch.active_message() is not None))

    def admitted(self, key: str, model: str, prompt_tokens: int) -> None:
        self.key_requests.labels(key).inc()
        self.key_tokens.labels(key, "prompt").inc(prompt_tokens)
        self.prompt_tokens.labels(model).inc(prompt_tokens)

    def completed(self, key: str, model: str, completion_tokens: int) -> None:
        self.key_tokens.labels(key, "completion").inc(completion_tokens)
        self.generated_tokens.labels(model).inc(completion_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware): it sees a streamed body's last chunk, so latency covers the stream."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        start = time.perf_counter()
        status, counted = [500], [False]

        def count() -> None:
            if not counted[0]:
                counted[0] = True
                self.metrics.requests.labels(endpoint, str(status[0])).inc()
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

        async def timed_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                count()

        try:
            await self.app(scope, receive, timed_send)
        finally:  # a client that went away mid-stream still counts (with the status it was sent)
            count()
