"""The server's Prometheus metrics (`GET /metrics`), in a registry of their own so that several servers can live
in one process (tests, `serve_in_background`)."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ServerMetrics"]

# Seconds; CPU serving of small models sits in the middle, a loaded server at the top.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self, queue_depth: Callable[[], float], batch_rows: Callable[[], float]):
        self.registry = CollectorRegistry()
        self.requests = Counter("paddle_glm_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=self.registry)
        self.queue_depth = Gauge("paddle_glm_queue_depth", "Requests waiting to join the batch",
                                 registry=self.registry)
        self.queue_depth.set_function(queue_depth)
        self.batch_rows = Gauge("paddle_glm_batch_rows", "Rows (sequences) in the running decode batch",
                                registry=self.registry)
        self.batch_rows.set_function(batch_rows)
        self.generated_tokens = Counter("paddle_glm_generated_tokens", "Tokens generated", registry=self.registry)
        self.time_to_first_token = Histogram("paddle_glm_time_to_first_token_seconds",
                                             "From a request's arrival to its first generated token",
                                             buckets=_BUCKETS, registry=self.registry)
        self.time_per_token = Histogram("paddle_glm_time_per_output_token_seconds",
                                        "Between consecutive generated tokens of a sequence", buckets=_BUCKETS,
                                        registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
