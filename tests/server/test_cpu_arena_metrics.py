"""The CPU tier's arena on /metrics: what operators (and bench-soak) read to tell memory
faulted in ahead by design from growth past it."""

from __future__ import annotations

from loramux.adapter_store.cpu_arena import CpuArena
from loramux.server.metrics import ServerMetrics
from tests.server.metric_samples import samples


def arena_bytes(got: dict, state: str) -> float:
    return got[("loramux_cpu_arena_bytes", (("state", state),))]


def test_arena_figures_follow_allocations_and_prefaulting():
    arena = CpuArena(capacity_bytes=8 << 20, prefault_ahead_bytes=2 << 20)
    metrics = ServerMetrics(max_loras=2)
    metrics.watch_cpu_arena(arena.stats)
    got = samples(metrics)
    assert arena_bytes(got, "capacity") == 8 << 20
    assert arena_bytes(got, "used") == 0
    assert arena_bytes(got, "prefault_target") == 2 << 20
    assert arena_bytes(got, "faulted") < 2 << 20

    while arena.prefault_step():
        pass
    block = arena.allocate(1 << 20)
    assert block is not None
    got = samples(metrics)
    assert arena_bytes(got, "faulted") >= 2 << 20
    assert arena_bytes(got, "used") >= 1 << 20
    assert got[("loramux_cpu_arena_allocations_total", (("memory", "recycled"),))] == 1
    assert got[("loramux_cpu_arena_allocations_total", (("memory", "fresh"),))] == 0


def test_no_arena_exports_nothing():
    metrics = ServerMetrics(max_loras=2)
    metrics.watch_cpu_arena(lambda: None)
    assert not any(name.startswith("loramux_cpu_arena") for name, _ in samples(metrics))
