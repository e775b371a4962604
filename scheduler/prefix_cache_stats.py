"""Prefix-cache lookups and hits per adapter, counted by the engine thread, read by metrics."""

from __future__ import annotations

import threading
from dataclasses import dataclass

BASE_LABEL = "base"  # the adapter label of base-model requests


@dataclass(frozen=True)
class PrefixCacheCounts:
    """Cumulative figures of one adapter (or the base model)."""

    requests: int = 0  # admissions that looked the cache up
    queries: int = 0  # tokens of those requests (vLLM's prefix_cache_queries)
    hits: int = 0  # of those, tokens found in the cache (vLLM's prefix_cache_hits)
    query_blocks: int = 0  # full blocks that could have been found
    hit_blocks: int = 0  # full blocks found


class PrefixCacheStats:
    """Cumulative counts per adapter label. record() on the engine thread; snapshot() anywhere."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, PrefixCacheCounts] = {}

    def record(self, adapter_id: str | None, num_tokens: int, num_hit_tokens: int,
               num_query_blocks: int, num_hit_blocks: int) -> None:
        label = adapter_id if adapter_id is not None else BASE_LABEL
        with self._lock:
            c = self._counts.get(label, PrefixCacheCounts())
            self._counts[label] = PrefixCacheCounts(
                c.requests + 1,
                c.queries + num_tokens,
                c.hits + num_hit_tokens,
                c.query_blocks + num_query_blocks,
                c.hit_blocks + num_hit_blocks,
            )

    def snapshot(self) -> dict[str, PrefixCacheCounts]:
        with self._lock:
            return dict(self._counts)

    def total(self) -> PrefixCacheCounts:
        counts = self.snapshot().values()
        return PrefixCacheCounts(*(sum(getattr(c, f) for c in counts) for f in PrefixCacheCounts.__dataclass_fields__))
