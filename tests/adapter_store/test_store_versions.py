"""Replacement, deletion and uploads: running requests keep the weights they started with,
new requests get the new version (only once it is loaded), deleted adapters are refused,
and nothing half-written or invalid is ever visible."""

from __future__ import annotations

import json
import os

import pytest
import torch

from loramux.adapter_store.errors import (
    AdapterInvalid,
    AdapterNotFound,
    AdapterTooLarge,
    AdapterUnsupported,
    UploadsDisabled,
    UploadTooLarge,
)
from loramux.adapter_store.format import (
    CONFIG_NAME,
    PICKLED_WEIGHTS_NAME,
    WEIGHTS_NAME,
    load_adapter,
)
from loramux.adapter_store.store import AdapterStatus
from tests.adapter_store.store_fixtures import (
    MAX_RANK,
    TINY_SPEC,
    CountingLoader,
    FakeClock,
    adapter_files,
    assert_slot_holds,
    make_store,
    slot_contents,
    write_adapter,
)
from tests.adapter_store.test_store_loading import wait_for


def loaded(directory):
    return load_adapter(directory.name, directory, TINY_SPEC, MAX_RANK, torch.float32)


def same_contents(a, b) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) and a[k][2] == b[k][2]
        for k in a
    )


@pytest.fixture
def dirs(tmp_path):
    """v1 and v2 of adapter "a" (different ranks and targets) and adapter "b"."""
    return {
        "a1": write_adapter(tmp_path / "v1", "a", seed=1, r=4),
        "a2": write_adapter(tmp_path / "v2", "a", seed=2, r=2, targets=("o_proj", "up_proj")),
        "b": write_adapter(tmp_path / "v1", "b", seed=3),
    }


def drained_store(tmp_path, max_slots=2, **kwargs):
    store = make_store(
        tmp_path / "v1", max_slots=max_slots, clock=FakeClock(), fresh_grace_s=0.0, **kwargs
    )
    store.start(run_loader=False)
    return store


def test_replacement_keeps_running_requests_on_the_old_weights(tmp_path, dirs):
    store = drained_store(tmp_path, max_slots=2)
    store.prefetch("a")
    store.drain()
    old_slot = store.pin("a")  # a running request
    before = slot_contents(store, old_slot)

    info = store.register_directory("a", dirs["a2"])
    assert info.version == 2 and info.rank == 2 and info.target_modules == ("o_proj", "up_proj")
    assert not store.is_resident("a") and store.pin("a") is None  # never the stale version
    store.drain()  # the new version was queued at once, since the old one was resident
    assert store.is_resident("a")
    new_slot = store.pin("a")
    assert new_slot != old_slot
    assert_slot_holds(store, new_slot, loaded(dirs["a2"]))
    assert same_contents(slot_contents(store, old_slot), before)
    assert_slot_holds(store, old_slot, loaded(dirs["a1"]))
    assert store.stats().num_retired == 1

    store.unpin(old_slot)  # the old request ends: its slot is freed
    stats = store.stats()
    assert (stats.num_retired, stats.num_device) == (0, 1)
    assert store.info("a").num_leases == 1
    store.unpin(new_slot)


def test_replacement_with_every_slot_leased_waits_for_the_lease(tmp_path, dirs):
    store = drained_store(tmp_path, max_slots=1)
    store.prefetch("a")
    store.drain()
    slot = store.pin("a")
    store.register_directory("a", dirs["a2"])
    store.drain()
    assert not store.is_resident("a")
    assert_slot_holds(store, slot, loaded(dirs["a1"]))
    store.unpin(slot)
    store.drain()
    assert store.pin("a") == slot
    assert_slot_holds(store, slot, loaded(dirs["a2"]))


def test_deletion_refuses_new_requests_and_frees_after_the_last_unpin(tmp_path, dirs):
    store = drained_store(tmp_path, max_slots=2)
    store.prefetch("a")
    store.drain()
    s1, s2 = store.pin("a"), store.pin("a")
    before = slot_contents(store, s1)
    store.delete("a")
    assert store.load_error("a") == "unknown adapter 'a'"
    assert not store.is_resident("a") and store.pin("a") is None
    store.prefetch("a")
    assert store.drain() == 0
    with pytest.raises(AdapterNotFound):
        store.info("a")
    with pytest.raises(AdapterNotFound):
        store.delete("a")
    stats = store.stats()
    assert (stats.num_retired, stats.num_cpu, stats.num_registered) == (1, 0, 1)
    store.unpin(s1)
    assert same_contents(slot_contents(store, s2), before)  # the second request still runs
    store.unpin(s2)
    stats = store.stats()
    assert (stats.num_retired, stats.num_device, stats.device_bytes) == (0, 0, 0)
    # Registered again later: a new version number, and served again.
    assert store.register_directory("a", dirs["a1"]).version == 2
    assert store.load_error("a") is None


def test_replaced_or_deleted_while_loading_is_never_published(tmp_path, dirs):
    loader = CountingLoader(hold=True)
    with make_store(tmp_path / "v1", max_slots=2, load_fn=loader) as store:
        store.prefetch("a")
        assert loader.started.wait(10)
        store.register_directory("a", dirs["a2"])  # while v1 is being read
        loader.release.set()
        wait_for(lambda: store.is_resident("a"))
        slot = store.pin("a")
        assert_slot_holds(store, slot, loaded(dirs["a2"]))
        store.unpin(slot)
        assert loader.calls == {"a": 2}

        loader.release.clear()
        loader.started.clear()
        store.prefetch("b")
        assert loader.started.wait(10)
        store.delete("b")
        loader.release.set()
        wait_for(lambda: store.stats().num_loading == 0)
        assert not store.is_resident("b") and store.stats().num_device == 1


# ------------------------------------------------------------------ uploads


def upload_store(tmp_path, **kwargs):
    kwargs.setdefault("clock", FakeClock())
    kwargs.setdefault("fresh_grace_s", 0.0)
    store = make_store(upload_root=tmp_path / "uploads", max_slots=2, **kwargs)
    store.start(run_loader=False)
    return store


def committed(tmp_path):
    root = tmp_path / "uploads"
    return sorted(str(p.relative_to(root)) for p in root.glob("*/*"))


def test_upload_raw_files_then_replace(tmp_path):
    loader = CountingLoader()
    store = upload_store(tmp_path, load_fn=loader)
    config, weights = adapter_files(seed=5)
    info = store.upload("x", config, weights)
    assert (info.version, info.source, info.status) == (1, "upload", AdapterStatus.CPU)
    assert committed(tmp_path) == ["x/1"]
    store.prefetch("x")
    store.drain()
    assert loader.calls == {}  # served from the CPU tier: validation read it already
    old_slot = store.pin("x")
    before = slot_contents(store, old_slot)

    config2, weights2 = adapter_files(seed=6, r=3)
    assert store.upload("x", config2, weights2).version == 2
    assert committed(tmp_path) == ["x/2"]  # the old version's files are gone
    store.drain()
    new_slot = store.pin("x")
    assert new_slot != old_slot
    assert_slot_holds(store, new_slot, loaded(tmp_path / "uploads" / "x" / "2"))
    assert same_contents(slot_contents(store, old_slot), before)
    store.unpin(old_slot)
    store.unpin(new_slot)
    store.delete("x")
    assert committed(tmp_path) == [] and not (tmp_path / "uploads" / "x").exists()


_DORA = b'{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_dora": true}'
# case -> (config or None for a good one, weights or None for good ones, error, words)
BAD_UPLOADS = {
    "bad_json": (b"{not json", None, AdapterInvalid, "JSON"),
    "wrong_shapes": (b'{"r": 2, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}',
                     None, AdapterInvalid, "shape"),
    "not_safetensors": (None, b"garbage", AdapterInvalid, "safetensors"),
    "dora": (_DORA, None, AdapterUnsupported, "DoRA"),
    "modules_to_save": (
        b'{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}',
        None,
        AdapterUnsupported,
        "modules_to_save (whole trained copies of base modules)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_invalid_upload_leaves_nothing_and_keeps_the_current_version(tmp_path, case):
    config, weights, error, words = BAD_UPLOADS[case]
    store = upload_store(tmp_path)
    good_config, good_weights = adapter_files(seed=1, targets=("q_proj", "v_proj"))
    store.upload("x", good_config, good_weights)
    with pytest.raises(error) as info:
        store.upload("x", config or good_config, weights or good_weights)
    assert words in str(info.value)
    assert "staging" not in str(info.value)  # names the user's file, not our temp path
    assert committed(tmp_path) == ["x/1"]
    assert list((tmp_path / "uploads" / ".staging").iterdir()) == []
    assert store.info("x").version == 1 and store.load_error("x") is None
    with pytest.raises(error):
        store.upload("y", config or good_config, weights or good_weights)
    with pytest.raises(AdapterNotFound):
        store.info("y")


def test_upload_size_limit(tmp_path):
    config, weights = adapter_files()
    store = upload_store(tmp_path, max_upload_bytes=len(config) + len(weights) - 1)
    with pytest.raises(UploadTooLarge, match="more than the limit") as info:
        store.upload("x", config, weights)
    assert isinstance(info.value, AdapterTooLarge)
    source = write_adapter(tmp_path, "src")
    with pytest.raises(UploadTooLarge):
        store.upload_directory("x", source)
    assert committed(tmp_path) == []
    assert list((tmp_path / "uploads" / ".staging").iterdir()) == []


def test_upload_directory_copies_and_validates(tmp_path):
    store = upload_store(tmp_path)
    source = write_adapter(tmp_path / "src", "anything", seed=4)
    (source / "README.md").write_text("not copied")
    info = store.upload_directory("y", source)
    assert info.version == 1
    assert sorted(os.listdir(tmp_path / "uploads" / "y" / "1")) == [CONFIG_NAME, WEIGHTS_NAME]
    assert (source / WEIGHTS_NAME).exists()  # the source is left alone
    (source / WEIGHTS_NAME).unlink()
    (source / PICKLED_WEIGHTS_NAME).write_bytes(b"\x80\x04 pickle")
    with pytest.raises(AdapterUnsupported, match="pickled"):
        store.upload_directory("y", source)
    with pytest.raises(AdapterNotFound):
        store.upload_directory("y", tmp_path / "missing")
    assert store.info("y").version == 1


def test_uploads_disabled_without_an_upload_root(tmp_path):
    store = make_store(max_slots=2)
    store.start(run_loader=False)
    with pytest.raises(UploadsDisabled):
        store.upload("x", *adapter_files())


def test_uploads_survive_a_restart(tmp_path):
    store = upload_store(tmp_path)
    store.upload("x", *adapter_files(seed=1))
    store.upload("x", *adapter_files(seed=2))
    store.upload("z", *adapter_files(seed=3))
    store.close()
    # Leftovers of a crash: a half-written staging dir and an old version not yet removed.
    (tmp_path / "uploads" / ".staging" / "upload-dead").mkdir()
    write_adapter(tmp_path / "uploads" / "x", "1")
    again = upload_store(tmp_path)
    assert [(i.adapter_id, i.version, i.source) for i in again.list()] == [
        ("x", 2, "upload"),
        ("z", 1, "upload"),
    ]
    assert committed(tmp_path) == ["x/2", "z/1"]
    assert list((tmp_path / "uploads" / ".staging").iterdir()) == []
    assert again.upload("x", *adapter_files(seed=4)).version == 3
    again.prefetch("z")
    again.drain()
    assert again.is_resident("z")


def test_register_directory_checks_the_config_and_keeps_the_current_version(tmp_path, dirs):
    store = drained_store(tmp_path)
    bad = write_adapter(tmp_path / "bad", "a")
    (bad / CONFIG_NAME).write_text(json.dumps({"r": 4}))
    with pytest.raises(AdapterInvalid, match="lora_alpha|target_modules"):
        store.register_directory("a", bad)
    assert store.info("a").version == 1 and store.load_error("a") is None
    assert store.register_directory("c", dirs["a2"]).source == "directory"
