"""SchedulerConfig: the scheduler's limits, parsed once at start-up and frozen."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


class SchedulerConfigError(ValueError):
    """A scheduler setting is out of range or inconsistent with another one."""


@dataclass(frozen=True)
class SchedulerConfig:
    # Tokens computed per step, summed over all scheduled requests (decodes count 1 each).
    max_num_batched_tokens: int = 2048
    # Requests in the running set at once (each holds KV blocks and maybe an adapter pin).
    max_num_seqs: int = 64
    # Blocks in the paged KV cache; the server sets this after profiling device memory.
    num_kv_blocks: int = 2048
    # Tokens per KV block.
    block_size: int = 16
    # Context length: prompt + output tokens of one request.
    max_model_len: int = 4096
    # Distinct adapter slots per step (= the device's adapter slots); base is not counted.
    max_loras: int = 8
    # Cap on one request's prefill chunk per step (0 = only the token budget caps it).
    long_prefill_token_threshold: int = 0
    # A request waiting longer than this (seconds) becomes a barrier: nothing queued behind
    # it is admitted until it is (see Scheduler). math.inf turns the barrier off.
    starvation_bound_s: float = 10.0
    # Reuse cached KV blocks of identical prompt prefixes (same adapter version only).
    enable_prefix_caching: bool = True
    # The model's EOS token ids (any iterable is accepted and frozen).
    eos_token_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_token_ids", _frozen_ids(self.eos_token_ids))
        _check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1")
        _check(self.max_num_seqs >= 1, "max_num_seqs must be >= 1")
        _check(self.num_kv_blocks >= 1, "num_kv_blocks must be >= 1")
        _check(self.block_size >= 1, "block_size must be >= 1")
        _check(self.max_model_len >= 2, "max_model_len must be >= 2 (one prompt + one output)")
        _check(self.max_loras >= 1, "max_loras must be >= 1")
        _check(self.long_prefill_token_threshold >= 0, "long_prefill_token_threshold must be >= 0")
        _check(
            self.starvation_bound_s > 0 and not math.isnan(self.starvation_bound_s),
            "starvation_bound_s must be > 0 (math.inf disables the barrier)",
        )
        # One request alone must always fit, or preempting everyone else cannot make room.
        _check(
            self.num_kv_blocks >= self.max_blocks_per_request,
            f"num_kv_blocks ({self.num_kv_blocks}) must hold one request of max_model_len "
            f"({self.max_model_len} tokens = {self.max_blocks_per_request} blocks)",
        )

    @property
    def max_blocks_per_request(self) -> int:
        """Blocks one request of max_model_len tokens needs."""
        return -(-self.max_model_len // self.block_size)


def _frozen_ids(ids: Iterable[int]) -> frozenset[int]:
    frozen = frozenset(ids)
    _check(
        all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in frozen),
        "eos_token_ids must be non-negative ints",
    )
    return frozen


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SchedulerConfigError(message)
