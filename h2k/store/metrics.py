"""The contract's metrics, computed from Redis so every API process agrees.

The counters are written by ``lua/transition.lua`` at each terminal
transition; this module only reads them, as a prometheus_client collector.
"""

from __future__ import annotations

from collections.abc import Iterator

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from h2k.capabilities import OPERATIONS
from h2k.states import ACTIVE
from h2k.store.connection import PREFIX, redis_errors
from h2k.store.jobs import DURATION_BUCKETS


class MigrationMetrics(Collector):
    def __init__(self, client: redis.Redis):
        self.redis = client

    def collect(self) -> Iterator[Metric]:
        with redis_errors():
            pipe = self.redis.pipeline(transaction=False)
            pipe.hgetall(f"{PREFIX}metrics:total")
            for operation in OPERATIONS:
                pipe.hgetall(f"{PREFIX}metrics:duration:{operation}")
            for state in sorted(ACTIVE):
                pipe.zcard(f"{PREFIX}jobs:state:{state}")
            totals, *rest = pipe.execute()
        histograms = rest[: len(OPERATIONS)]
        active = sum(rest[len(OPERATIONS) :])

        total = CounterMetricFamily(
            "hyper2kvm_migration",
            "Total number of migrations",
            labels=["status", "operation"],
        )
        for key, value in sorted(totals.items()):
            status, _, operation = key.partition("|")
            total.add_metric([status, operation], float(value))
        yield total

        duration = HistogramMetricFamily(
            "hyper2kvm_migration_duration_seconds",
            "Migration duration",
            labels=["operation"],
        )
        for operation, hist in zip(OPERATIONS, histograms, strict=True):
            if not hist:
                continue
            buckets = [
                (str(float(b)), float(hist.get(str(b), 0))) for b in DURATION_BUCKETS
            ]
            buckets.append(("+Inf", float(hist.get("+Inf", 0))))
            duration.add_metric([operation], buckets, float(hist.get("sum", 0)))
        yield duration

        yield GaugeMetricFamily(
            "hyper2kvm_worker_jobs_active",
            "Current number of active jobs",
            value=active,
        )
