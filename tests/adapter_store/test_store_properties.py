"""Property test: random prefetch / pin / unpin / replace / delete / (un)pin-for-good /
clock sequences against the store (loads drained in the test's thread).

After every operation:
- the CPU tier holds at most its budget;
- every lease still reads the weights it was pinned with (a leased slot is never
  evicted or written, also when its adapter is replaced or deleted);
- a pin returns a slot holding the current version's weights, exactly as format.load_adapter
  reads them;
- a permanently pinned adapter, once resident, stays resident while its version is current;
- the store's lease counts match the test's.
At the end, with every lease dropped and the grace period over, any adapter loads.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loramux.adapter_store.format import load_adapter
from tests.adapter_store.store_fixtures import (
    MAX_RANK,
    TINY_SPEC,
    FakeClock,
    adapter_bytes,
    assert_slot_holds,
    make_store,
    slot_contents,
    write_adapter,
)

IDS = ["a", "b", "c", "d"]
VERSIONS = 2  # two directories per id, registered in turn on "replace"


class Sources(dict):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return f"<{len(self)} adapter sources>"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(id, k) -> (directory, loaded adapter); ranks vary so slots hold mixed ranks."""
    root = tmp_path_factory.mktemp("sources")
    out = Sources()
    for i, adapter_id in enumerate(IDS):
        for k in range(VERSIONS):
            targets = ("q_proj", "v_proj") if (i + k) % 2 else ("k_proj", "down_proj")
            directory = write_adapter(
                root / f"v{k}", adapter_id, seed=10 * i + k, r=2 + (i + k) % 3, targets=targets
            )
            adapter = load_adapter(adapter_id, directory, TINY_SPEC, MAX_RANK, torch.float32)
            out[(adapter_id, k)] = (directory, adapter)
    return out


OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["load"] * 4 + ["pin"] * 4 + ["unpin"] * 3 + ["prefetch", "drain", "tick"] * 2
            + ["replace", "delete", "pin_for_good", "unpin_for_good"]
        ),
        st.integers(0, len(IDS) - 1),
    ),
    max_size=60,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    num_slots=st.integers(2, 3),
    cpu_adapters=st.sampled_from([0, 1, 2.5, 10]),
    grace=st.sampled_from([0.0, 2.0]),
    ops=OPS,
)
def test_store_invariants(tmp_path, sources, num_slots, cpu_adapters, grace, ops):
    clock = FakeClock()
    budget = int(cpu_adapters * adapter_bytes(r=4))
    store = make_store(
        max_slots=num_slots, cpu_cache_bytes=budget, clock=clock, fresh_grace_s=grace
    )
    store.start(run_loader=False)
    current: dict[str, int] = {}  # id -> k of its registered directory
    for adapter_id in IDS:
        store.register_directory(adapter_id, sources[(adapter_id, 0)][0])
        current[adapter_id] = 0
    leases: list[tuple[int, dict]] = []  # (slot, its contents when pinned)
    steady: set[str] = set()  # permanently pinned adapters seen resident since registered

    for op, i in ops:
        adapter_id = IDS[i]
        if op == "prefetch":
            store.prefetch(adapter_id)
        elif op == "load":
            store.prefetch(adapter_id)
            store.drain()
        elif op == "pin":
            slot = store.pin(adapter_id)
            assert (slot is not None) == store.is_resident(adapter_id)
            assert slot is None or adapter_id in current
            if slot is not None:
                assert_slot_holds(store, slot, sources[(adapter_id, current[adapter_id])][1])
                leases.append((slot, slot_contents(store, slot)))
        elif op == "unpin" and leases:
            slot, _ = leases.pop(i % len(leases))
            store.unpin(slot)
        elif op == "drain":
            store.drain()
        elif op == "tick":
            clock.now += 1.0
        elif op == "replace":
            k = (current.get(adapter_id, 0) + 1) % VERSIONS
            info = store.register_directory(adapter_id, sources[(adapter_id, k)][0])
            current[adapter_id] = k
            steady.discard(adapter_id)
            assert not store.is_resident(adapter_id)  # never the stale version
            assert info.pinned == (adapter_id in pinned_ids(store))
        elif op == "delete" and adapter_id in current:
            store.delete(adapter_id)
            del current[adapter_id]
            steady.discard(adapter_id)
            assert store.load_error(adapter_id) == f"unknown adapter {adapter_id!r}"
            assert store.pin(adapter_id) is None
        elif op == "pin_for_good" and adapter_id in current:
            if len(pinned_ids(store)) < num_slots - 1:
                store.pin_permanent(adapter_id)
        elif op == "unpin_for_good" and adapter_id in current:
            store.unpin_permanent(adapter_id)
            steady.discard(adapter_id)

        # Invariants.
        stats = store.stats()
        assert stats.cpu_bytes <= budget
        for slot, contents in leases:
            now = slot_contents(store, slot)
            assert now.keys() == contents.keys()
            for key, (a, b, r) in contents.items():
                assert now[key][2] == r and torch.equal(now[key][0], a)
                assert torch.equal(now[key][1], b)
        pinned = pinned_ids(store)
        for adapter_id in pinned:
            if store.is_resident(adapter_id):
                steady.add(adapter_id)
        assert steady <= {a for a in pinned if store.is_resident(a)}, "a pinned adapter left"
        counts: dict[int, int] = {}
        for slot, _ in leases:
            counts[slot] = counts.get(slot, 0) + 1
        assert stats.num_leased_slots == len(counts)
        assert all(store._slots.refs(s) == n for s, n in counts.items())

    # Liveness: with no leases, every adapter loads once the loads queued before it are
    # done and their grace periods are over.
    for slot, _ in leases:
        store.unpin(slot)
    for adapter_id in current:
        for _ in range(len(IDS) + 1):
            store.prefetch(adapter_id)  # as the scheduler does, every step it waits
            store.drain()
            if store.is_resident(adapter_id):
                break
            clock.now += 10.0
        assert store.is_resident(adapter_id), store.info(adapter_id)
        slot = store.pin(adapter_id)
        assert_slot_holds(store, slot, sources[(adapter_id, current[adapter_id])][1])
        store.unpin(slot)
    assert store.stats().num_retired == 0  # replaced and deleted versions all freed


def pinned_ids(store) -> set[str]:
    return {info.adapter_id for info in store.list() if info.pinned}
