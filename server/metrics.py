"""Prometheus metrics: requests, latencies, the batch, the KV cache and the adapter tiers.

Besides loramux_* families, the names Kubernetes' Gateway API Inference Extension scrapes
for LoRA-aware routing are exported exactly as vLLM names them (vllm:num_requests_waiting,
vllm:num_requests_running, vllm:kv_cache_usage_perc, vllm:lora_requests_info), so that
router treats loramux as it treats vLLM. Prefix-cache lookups and hits per adapter are
exported under vLLM's names (vllm:prefix_cache_queries / vllm:prefix_cache_hits, in tokens)
and as loramux_prefix_cache_{queries,hits}{adapter, unit="tokens"|"blocks"}.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from loramux.adapter_store.cpu_arena import ArenaStats
from loramux.adapter_store.ids import DERIVED_PREFIX
from loramux.adapter_store.stats import LoadEvent, StoreStats
from loramux.scheduler.prefix_cache_stats import PrefixCacheCounts

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class ServerMetrics:
    def __init__(self, max_loras: int, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.max_loras = max_loras
        self.requests = Counter(
            "loramux_requests", "Finished requests.", ["endpoint", "adapter", "outcome"], registry=r
        )
        self.ttft = Histogram(
            "loramux_time_to_first_token_seconds", "Time to first token.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "loramux_inter_token_latency_seconds", "Time between output tokens.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "loramux_e2e_request_latency_seconds", "Arrival to finish.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Histogram(
            "loramux_request_prompt_tokens", "Prompt tokens per request.", buckets=TOKEN_BUCKETS, registry=r
        )
        self.generation_tokens = Histogram(
            "loramux_request_generation_tokens", "Generated tokens per request.", buckets=TOKEN_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "loramux_batch_size_requests", "Requests scheduled per engine step.", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "loramux_batch_size_tokens", "Tokens computed per engine step.", buckets=BATCH_BUCKETS, registry=r
        )
        self.running = Gauge("loramux_num_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge("loramux_num_requests_waiting", "Requests waiting to run.", registry=r)
        self.kv_usage = Gauge("loramux_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.", registry=r)
        self.adapter_load_seconds = Histogram(
            "loramux_adapter_load_seconds", "Adapter load latency (read + write to the device).",
            ["source"], buckets=LATENCY_BUCKETS, registry=r,
        )
        # The Gateway API Inference Extension's names, as vLLM exports them.
        self.vllm_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be processed.", registry=r)
        self.vllm_running = Gauge("vllm:num_requests_running", "Requests in the running batch.", registry=r)
        self.vllm_kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 1 = 100%.", registry=r)
        self.vllm_lora_info = Gauge(
            "vllm:lora_requests_info", "Running and waiting LoRA adapters; value = last update time.",
            ["max_lora", "running_lora_adapters", "waiting_lora_adapters"], registry=r,
        )
        self._lora_lock = threading.Lock()
        self._lora_labels: tuple[str, str] | None = None
        self._store_stats: Callable[[], StoreStats] | None = None

    # ------------------------------------------------------------------ engine side

    def observe_step(self, num_requests: int, num_tokens: int, running: int, waiting: int, kv_usage: float,
                     running_adapters: frozenset[str], waiting_adapters: frozenset[str]) -> None:
        """Called by the engine thread after every step."""
        if num_requests:
            self.batch_requests.observe(num_requests)
            self.batch_tokens.observe(num_tokens)
        for gauge, value in ((self.running, running), (self.vllm_running, running), (self.waiting, waiting),
                             (self.vllm_waiting, waiting), (self.kv_usage, kv_usage), (self.vllm_kv_usage, kv_usage)):
            gauge.set(value)
        labels = (",".join(sorted(running_adapters)), ",".join(sorted(waiting_adapters)))
        with self._lora_lock:
            if labels != self._lora_labels:  # keep one series: the current sets
                self.vllm_lora_info.clear()
                self._lora_labels = labels
            self.vllm_lora_info.labels(str(self.max_loras), *labels).set(time.time())

    def observe_adapter_load(self, event: LoadEvent) -> None:
        """The adapter store's on_load hook (any thread)."""
        if event.ok:
            self.adapter_load_seconds.labels(event.source).observe(event.load_s)

    def watch_store(self, stats: Callable[[], StoreStats]) -> None:
        """Export the store's tier figures at every scrape."""
        self._store_stats = stats
        self.registry.register(_StoreCollector(stats))

    def watch_cpu_arena(self, stats: Callable[[], ArenaStats | None]) -> None:
        """Export the CPU tier's memory (used, faulted in, prefault target) at every scrape."""
        self.registry.register(_ArenaCollector(stats))

    def watch_prefix_cache(
        self, counts: Callable[[], dict[str, PrefixCacheCounts]], num_cached_blocks: Callable[[], int]
    ) -> None:
        """Export the scheduler's prefix-cache counts per adapter at every scrape."""
        self.registry.register(_PrefixCacheCollector(counts, num_cached_blocks))

    # ------------------------------------------------------------------ request side

    def start_request(self, endpoint: str, adapter: str | None) -> RequestTimer:
        # merges are made per request by clients: one label for all, so they cannot grow the series
        label = "merged" if adapter and adapter.startswith(DERIVED_PREFIX) else adapter or "base"
        return RequestTimer(self, endpoint, label)


class RequestTimer:
    """Times one request: first token, gaps between tokens, the end."""

    def __init__(self, metrics: ServerMetrics, endpoint: str, adapter: str) -> None:
        self.metrics = metrics
        self.endpoint = endpoint
        self.adapter = adapter
        self.started = time.monotonic()
        self.last_token: float | None = None
        self.done = False

    def tokens(self, count: int) -> None:
        if count <= 0:
            return
        now = time.monotonic()
        if self.last_token is None:
            self.metrics.ttft.observe(now - self.started)
        else:
            self.metrics.itl.observe((now - self.last_token) / count)
        self.last_token = now

    def finish(self, outcome: str, prompt_tokens: int = 0, generated_tokens: int = 0) -> None:
        if self.done:
            return
        self.done = True
        self.metrics.requests.labels(self.endpoint, self.adapter, outcome).inc()
        self.metrics.e2e.observe(time.monotonic() - self.started)
        if prompt_tokens:
            self.metrics.prompt_tokens.observe(prompt_tokens)
        self.metrics.generation_tokens.observe(generated_tokens)


class _StoreCollector:
    """Adapter tiers, read from the store at scrape time."""

    def __init__(self, stats: Callable[[], StoreStats]) -> None:
        self._stats = stats

    def collect(self):
        s = self._stats()
        adapters = GaugeMetricFamily("loramux_adapters", "Adapters per tier.", labels=["tier"])
        adapters.add_metric(["disk"], s.num_registered)
        adapters.add_metric(["cpu"], s.num_cpu)
        adapters.add_metric(["device"], s.num_device)
        yield adapters
        nbytes = GaugeMetricFamily("loramux_adapter_bytes", "Adapter bytes per tier.", labels=["tier"])
        nbytes.add_metric(["disk"], s.disk_bytes)
        nbytes.add_metric(["cpu"], s.cpu_bytes)
        nbytes.add_metric(["device"], s.device_bytes)
        yield nbytes
        slots = GaugeMetricFamily("loramux_adapter_slots", "Device adapter slots by state.", labels=["state"])
        slots.add_metric(["total"], s.num_slots)
        slots.add_metric(["leased"], s.num_leased_slots)
        slots.add_metric(["retired"], s.num_retired)
        yield slots
        yield GaugeMetricFamily("loramux_adapters_loading", "Adapters queued or loading.", value=s.num_loading)
        yield GaugeMetricFamily("loramux_adapters_pinned", "Adapters pinned on the device.", value=s.num_pinned)
        hits = CounterMetricFamily("loramux_adapter_hits", "Tier hits.", labels=["tier"])
        hits.add_metric(["device"], s.device_hits)
        hits.add_metric(["cpu"], s.cpu_hits)
        yield hits
        misses = CounterMetricFamily("loramux_adapter_misses", "Tier misses.", labels=["tier"])
        misses.add_metric(["device"], s.device_misses)
        misses.add_metric(["cpu"], s.cpu_misses)
        yield misses
        yield CounterMetricFamily("loramux_adapter_loads", "Adapters written to the device.", value=s.loads)
        yield CounterMetricFamily("loramux_adapter_load_failures", "Adapter loads that failed.", value=s.load_failures)
        evictions = CounterMetricFamily("loramux_adapter_evictions", "Evictions per tier.", labels=["tier"])
        evictions.add_metric(["cpu"], s.cpu_evictions)
        evictions.add_metric(["device"], s.device_evictions)
        yield evictions


class _ArenaCollector:
    """The CPU tier's arena: how much of its mapping is in use and faulted in. Faulted-in
    memory grows ahead of use while the loader is idle (up to the prefault target), so RSS
    grows with it by design; a leak shows as growth past the target."""

    def __init__(self, stats: Callable[[], ArenaStats | None]) -> None:
        self._stats = stats

    def collect(self):
        s = self._stats()
        if s is None:  # no arena (the CPU tier is off, or the mapping failed)
            return
        nbytes = GaugeMetricFamily("loramux_cpu_arena_bytes", "The CPU tier's arena by state.", labels=["state"])
        nbytes.add_metric(["capacity"], s.capacity_bytes)
        nbytes.add_metric(["used"], s.used_bytes)
        nbytes.add_metric(["faulted"], s.faulted_bytes)
        nbytes.add_metric(["prefault_target"], s.prefault_target_bytes)
        yield nbytes
        allocations = CounterMetricFamily(
            "loramux_cpu_arena_allocations", "CPU tier allocations: in memory faulted in before, or reaching fresh pages.", labels=["memory"]
        )
        allocations.add_metric(["recycled"], s.num_recycled)
        allocations.add_metric(["fresh"], s.num_unfaulted)
        yield allocations


class _PrefixCacheCollector:
    """Prefix-cache lookups and hits per adapter (cumulative), read at scrape time."""

    def __init__(self, counts: Callable[[], dict[str, PrefixCacheCounts]],
                 num_cached_blocks: Callable[[], int]) -> None:
        self._counts = counts
        self._num_cached_blocks = num_cached_blocks

    def collect(self):
        counts = sorted(self._counts().items())
        queries = CounterMetricFamily(
            "vllm:prefix_cache_queries", "Prefix-cache queries, in tokens (prompt tokens looked up).",
            labels=["adapter"])
        hits = CounterMetricFamily(
            "vllm:prefix_cache_hits", "Prefix-cache hits, in tokens (tokens not recomputed).", labels=["adapter"])
        l_queries = CounterMetricFamily(
            "loramux_prefix_cache_queries", "Prefix-cache queries per adapter, in tokens and in full blocks.",
            labels=["adapter", "unit"])
        l_hits = CounterMetricFamily(
            "loramux_prefix_cache_hits", "Prefix-cache hits per adapter, in tokens and in full blocks.",
            labels=["adapter", "unit"])
        requests = CounterMetricFamily(
            "loramux_prefix_cache_requests", "Admissions that looked the prefix cache up.", labels=["adapter"])
        for adapter, c in counts:
            queries.add_metric([adapter], c.queries)
            hits.add_metric([adapter], c.hits)
            l_queries.add_metric([adapter, "tokens"], c.queries)
            l_queries.add_metric([adapter, "blocks"], c.query_blocks)
            l_hits.add_metric([adapter, "tokens"], c.hits)
            l_hits.add_metric([adapter, "blocks"], c.hit_blocks)
            requests.add_metric([adapter], c.requests)
        yield from (queries, hits, l_queries, l_hits, requests)
        yield GaugeMetricFamily(
            "loramux_prefix_cache_blocks", "KV blocks registered in the prefix cache (in use or evictable).",
            value=self._num_cached_blocks())
