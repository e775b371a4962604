"""A metrics registry as Prometheus would read it: {(sample name, sorted labels): value}."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from loramux.server.metrics import ServerMetrics


def samples(metrics: ServerMetrics) -> dict[tuple, float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
