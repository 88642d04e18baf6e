"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from embedtune.serve.batching import BatchStats

_POW2 = tuple(float(2**i) for i in range(12))  # 1 .. 2048 inputs per batch
_TOKENS = tuple(float(2**i) for i in range(4, 18))  # 16 .. 131072 tokens per batch
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("embedtune_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("embedtune_request_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=_LATENCY, registry=r)
        self.batch_size = Histogram("embedtune_batch_size", "inputs per encoded batch", ["model"],
                                    buckets=_POW2, registry=r)
        self.batch_tokens = Histogram("embedtune_batch_tokens", "real tokens per encoded batch", ["model"],
                                      buckets=_TOKENS, registry=r)
        self.queue_requests = Gauge("embedtune_queue_depth", "requests admitted and not yet answered",
                                    ["model"], registry=r)
        self.queue_inputs = Gauge("embedtune_queue_inputs", "inputs waiting for a batch", ["model"],
                                  registry=r)
        self.tokens = Counter("embedtune_prompt_tokens", "tokens embedded", ["model"], registry=r)

    def batch_stats(self, model: str) -> BatchStats:
        def on_batch(n_inputs: int, n_tokens: int) -> None:
            self.batch_size.labels(model).observe(n_inputs)
            self.batch_tokens.labels(model).observe(n_tokens)

        def on_queue(n_requests: int, n_inputs: int) -> None:
            self.queue_requests.labels(model).set(n_requests)
            self.queue_inputs.labels(model).set(n_inputs)

        return BatchStats(on_batch, on_queue)

    def render(self) -> bytes:
        return generate_latest(self.registry)
