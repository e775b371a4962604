"""Prefix-cache metrics: vLLM's names (tokens) and loramux's (tokens and blocks), per adapter."""

from __future__ import annotations

from loramux.scheduler.prefix_cache_stats import PrefixCacheStats
from loramux.server.metrics import ServerMetrics
from tests.server.metric_samples import samples


def test_queries_and_hits_per_adapter_in_tokens_and_blocks():
    stats = PrefixCacheStats()
    metrics = ServerMetrics(max_loras=2)
    metrics.watch_prefix_cache(stats.snapshot, lambda: 7)
    stats.record("a", num_tokens=40, num_hit_tokens=32, num_query_blocks=9, num_hit_blocks=8)
    stats.record("a", num_tokens=10, num_hit_tokens=0, num_query_blocks=2, num_hit_blocks=0)
    stats.record(None, num_tokens=20, num_hit_tokens=16, num_query_blocks=4, num_hit_blocks=4)
    got = samples(metrics)
    assert got[("vllm:prefix_cache_queries_total", (("adapter", "a"),))] == 50
    assert got[("vllm:prefix_cache_hits_total", (("adapter", "a"),))] == 32
    assert got[("vllm:prefix_cache_hits_total", (("adapter", "base"),))] == 16
    assert got[("loramux_prefix_cache_queries_total", (("adapter", "a"), ("unit", "blocks")))] == 11
    assert got[("loramux_prefix_cache_hits_total", (("adapter", "a"), ("unit", "blocks")))] == 8
    assert got[("loramux_prefix_cache_hits_total", (("adapter", "a"), ("unit", "tokens")))] == 32
    assert got[("loramux_prefix_cache_requests_total", (("adapter", "a"),))] == 2
    assert got[("loramux_prefix_cache_blocks", ())] == 7
