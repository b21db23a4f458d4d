"""The service's Prometheus metrics: one registry per app instance.

Not the process-global default registry: tests build many apps in one process, and each app must count only
its own requests. Request metrics are recorded by the middleware when a response ends; engine, prefix-tier and
training-job metrics are read by collectors at scrape time (see `collectors`).

Labels stay low-cardinality on purpose: the route *template* (never the raw path, which holds prefix names),
method and status. Tenants and models are in the access log, not in labels: a model per end user would create
a time series per user.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from app.observability.collectors import (
    EngineCollector,
    PrefixTierCollector,
    RuntimeSource,
    TrainingJobsCollector,
)
from app.observability.context import RequestRecord

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds. Requests span a 5 ms model listing to a minutes-long stream; loads span a device hit to an S3 read.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
UNMATCHED_ROUTE = "unmatched"  # 404s for unknown paths share one label value, whatever the path


class Metrics:
    """The registry and the metrics the request path updates; the collectors read `runtime()` at scrape."""

    def __init__(self, runtime: RuntimeSource) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter("prefixserve_http_requests", "HTTP requests by route template, method, status.",
                                ["route", "method", "status"], registry=r)
        self.duration = Histogram("prefixserve_http_request_duration_seconds",
                                  "Time from request arrival to the end of the response (streams: last event).",
                                  ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("prefixserve_http_requests_in_flight", "Requests being served.", registry=r)
        self.ttft = Histogram("prefixserve_time_to_first_token_seconds",
                              "Time from request arrival to the first generated token (completions, chat).",
                              ["route"], buckets=TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("prefixserve_prompt_tokens", "Prompt tokens of served requests.",
                                     ["route"], registry=r)
        self.completion_tokens = Counter("prefixserve_completion_tokens", "Tokens generated for clients.",
                                         ["route"], registry=r)
        self.prefix_load = Histogram("prefixserve_prefix_load_duration_seconds",
                                     "Cold prefix loads: cache-tier or object-store read, decode, move to device.",
                                     ["source"], buckets=LOAD_BUCKETS, registry=r)
        for collector in (EngineCollector(runtime), PrefixTierCollector(runtime), TrainingJobsCollector(runtime)):
            r.register(collector)

    def observe_request(self, *, route: str, method: str, status: int, seconds: float,
                        record: RequestRecord) -> None:
        """Count a finished request; token and first-token metrics only for requests that generated."""
        self.requests.labels(route, method, str(status)).inc()
        self.duration.labels(route, method).observe(seconds)
        if record.prompt_tokens:
            self.prompt_tokens.labels(route).inc(record.prompt_tokens)
        if record.completion_tokens:
            self.completion_tokens.labels(route).inc(record.completion_tokens)
        ttft = record.ttft_s
        if ttft is not None:
            self.ttft.labels(route).observe(ttft)

    def observe_prefix_load(self, source: str, seconds: float) -> None:
        """The resolver's load observer (called on the engine's resolver threads; prometheus_client is
        thread-safe)."""
        self.prefix_load.labels(source).observe(seconds)

    def exposition(self) -> bytes:
        """The text exposition format (collectors run now, in the caller's thread)."""
        return generate_latest(self.registry)
