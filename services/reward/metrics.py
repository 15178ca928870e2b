"""The reward service's own Prometheus metrics (HTTP request metrics come from shared.server)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.batching import BatchStats

_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536)
_FRACTION_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
_SECOND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class RewardMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.queue_depth = Gauge("reward_queue_depth", "Texts waiting for a batch", ["model"], registry=registry)
        self.batch_size = Histogram("reward_batch_size", "Texts per batch", ["model"], buckets=_SIZE_BUCKETS,
                                    registry=registry)
        self.batch_tokens = Histogram("reward_batch_tokens", "Real (unpadded) tokens per batch", ["model"],
                                      buckets=_TOKEN_BUCKETS, registry=registry)
        self.padding = Histogram("reward_batch_padding_fraction", "Share of a batch's tokens that are padding",
                                 ["model"], buckets=_FRACTION_BUCKETS, registry=registry)
        self.batch_seconds = Histogram("reward_batch_seconds", "Forward time per batch", ["model"],
                                       buckets=_SECOND_BUCKETS, registry=registry)
        self.batch_failures = Counter("reward_batch_failures_total", "Batches whose forward pass failed", ["model"],
                                      registry=registry)
        self.texts = Counter("reward_texts_total", "Texts scored or classified", ["model"], registry=registry)
        self.loaded = Gauge("reward_models_loaded", "Models being served", registry=registry)

    def observe_batch(self, model: str, stats: BatchStats) -> None:
        if stats.failed:
            self.batch_failures.labels(model).inc()
            return
        self.batch_size.labels(model).observe(stats.size)
        self.batch_tokens.labels(model).observe(stats.tokens)
        self.padding.labels(model).observe(1 - stats.tokens / stats.padded_tokens)
        self.batch_seconds.labels(model).observe(stats.seconds)
        self.texts.labels(model).inc(stats.size)
