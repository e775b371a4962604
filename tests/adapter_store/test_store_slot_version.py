"""AdapterStore.slot_version: the version a pinned slot holds (the prefix cache's key)."""

from __future__ import annotations

from tests.adapter_store.store_fixtures import FakeClock, make_store, write_adapter


def test_slot_version_follows_replacement_and_delete(tmp_path):
    root = tmp_path / "adapters"
    write_adapter(root, "a", seed=0)
    store = make_store(root, max_slots=3, clock=FakeClock())
    store.start(run_loader=False)
    store.prefetch("a")
    store.drain()
    old = store.pin("a")
    assert old is not None and store.slot_version(old) == 1

    write_adapter(tmp_path / "v2", "a", seed=1)
    store.register_directory("a", tmp_path / "v2" / "a")  # a new version; the old slot still leased
    assert store.slot_version(old) == 1  # running requests keep the version they pinned
    store.prefetch("a")
    store.drain()
    new = store.pin("a")
    assert new is not None and new != old and store.slot_version(new) == 2
    store.unpin(old)
    store.unpin(new)

    store.delete("a")
    store.register_directory("a", tmp_path / "v2" / "a")  # versions never repeat across deletes
    store.prefetch("a")
    store.drain()
    slot = store.pin("a")
    assert slot is not None and store.slot_version(slot) == 3
    store.unpin(slot)
    store.close()
