"""Every metric the dashboard and the alert rules read is one the server exports (offline:
the server's metrics registry, rendered). `make test-dashboard` runs them for real."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from loramux.adapter_store.stats import LoadEvent, StoreStats
from loramux.scheduler.prefix_cache_stats import PrefixCacheCounts
from loramux.server.metrics import ServerMetrics
from tests.deploy.promql import PROMETHEUS_SERIES, alert_expressions, dashboard_expressions, metric_names


def exported_series_names() -> set[str]:
    metrics = ServerMetrics(max_loras=4)
    metrics.watch_store(lambda: StoreStats(*([0] * 20), load_latency_s=()))
    metrics.watch_prefix_cache(lambda: {"base": PrefixCacheCounts(1, 16, 8, 1, 1)}, lambda: 1)
    timer = metrics.start_request("generate", None)
    timer.tokens(1)
    timer.tokens(1)
    timer.finish("ok", prompt_tokens=3, generated_tokens=2)
    metrics.observe_step(1, 3, 1, 0, 0.1, frozenset(), frozenset())
    metrics.observe_adapter_load(LoadEvent("a", 1, "disk", ok=True, load_s=0.01, queued_s=0.01))
    names = set()
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        names |= {sample.name for sample in family.samples}
    return names


EXPRESSIONS = [("dashboard", *e) for e in dashboard_expressions()] + [("alert", *e) for e in alert_expressions()]


def test_the_lexer_finds_names_and_only_names():
    assert metric_names('histogram_quantile(0.99, sum(rate(a_bucket{x="y"}[1m])) by (le))') == {"a_bucket"}
    assert metric_names("b > 8 and delta(b[5m]) > 0") == {"b"}
    assert metric_names('up{job="loramux"} == 0') == {"up"}
    assert metric_names("sum(rate(c_total[5m])) by (adapter) / ignoring(x) d") == {"c_total", "d"}


def test_there_are_expressions_and_alerts_for_the_usual_failures():
    assert len(EXPRESSIONS) >= 10
    alerts = {name for kind, name, _ in EXPRESSIONS if kind == "alert"}
    assert {"LoramuxDown", "LoramuxQueueGrowing", "LoramuxAdapterLoadFailures", "LoramuxKVCacheNearlyFull"} <= alerts


@pytest.mark.parametrize("kind,title,expr", EXPRESSIONS, ids=[f"{k}:{t}" for k, t, _ in EXPRESSIONS])
def test_expression_names_only_exported_metrics(kind, title, expr):
    names = metric_names(expr)
    assert names, f"{title}: no metric found in {expr!r}"
    unknown = names - exported_series_names() - PROMETHEUS_SERIES
    assert not unknown, f"{kind} {title!r} reads {sorted(unknown)}, which the server does not export"
