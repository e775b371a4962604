"""Segment layouts shared by the kernel tests: how a batch's tokens spread over adapters."""

from __future__ import annotations

import random

NUM_SLOTS = 6


def segment_layout(name: str, num_tokens: int, seed: int = 0) -> list[tuple[int, int]]:
    """(slot, num_tokens) per sequence, in row order; slot -1 = base (no adapter)."""
    rng = random.Random(seed)
    if name == "identical":  # every token on one adapter
        return [(2, num_tokens)]
    if name == "distinct":  # one token per adapter, cycling through the slots
        return [(t % NUM_SLOTS, 1) for t in range(num_tokens)]
    if name == "uniform":
        size = max(1, num_tokens // NUM_SLOTS)
        seqs, left, slot = [], num_tokens, 0
        while left:
            n = min(size, left)
            seqs.append((slot % NUM_SLOTS, n))
            left -= n
            slot += 1
        return seqs
    if name == "zipf":  # a few hot adapters, a long tail
        weights = [1.0 / (k + 1) for k in range(NUM_SLOTS)]
        slots = sorted(rng.choices(range(NUM_SLOTS), weights=weights, k=num_tokens))
        return [(s, 1) for s in slots]
    if name == "skewed":  # one long prefill and single-token decodes
        return [(0, max(1, num_tokens - 3))] + [(s, 1) for s in (1, 3, 5)][: num_tokens - 1]
    if name == "empty_segment":
        return [(1, num_tokens // 2), (3, 0), (4, num_tokens - num_tokens // 2)]
    if name == "all_base":
        return [(-1, num_tokens)]
    if name == "mixed_base":
        return [(-1, 2), (0, num_tokens - 4), (-1, 1), (5, 1)]
    if name == "single_token":
        return [(4, 1)]
    raise ValueError(name)


LAYOUTS = (
    "identical",
    "distinct",
    "uniform",
    "zipf",
    "skewed",
    "empty_segment",
    "all_base",
    "mixed_base",
    "single_token",
)
