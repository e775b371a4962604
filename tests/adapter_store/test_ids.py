"""Adapter ids: only a conservative character set, and never a path of their own."""

from __future__ import annotations

import pytest

from loramux.adapter_store.errors import AdapterError, InvalidAdapterId
from loramux.adapter_store.ids import MAX_ADAPTER_ID_LEN, check_adapter_id
from tests.adapter_store.store_fixtures import adapter_files, make_store, write_adapter

VALID = ["a", "A1", "my-adapter", "org.model_v2", "0", "x" * MAX_ADAPTER_ID_LEN, "a.b-c_d"]
INVALID = [
    "",
    "../x",
    "..",
    ".",
    "a/b",
    "a\\b",
    "/abs",
    "a..b",
    ".hidden",
    "-flag",
    "_x",
    "x" * 300,
    "x" * (MAX_ADAPTER_ID_LEN + 1),
    "a b",
    "a\n",
    "a\x00b",
    "ünï",
    "a:b",
    "~root",
    None,
    7,
    b"bytes",
]


@pytest.mark.parametrize("adapter_id", VALID)
def test_valid_ids(adapter_id):
    assert check_adapter_id(adapter_id) == adapter_id


@pytest.mark.parametrize("adapter_id", INVALID)
def test_invalid_ids(adapter_id):
    with pytest.raises(InvalidAdapterId) as info:
        check_adapter_id(adapter_id)
    assert isinstance(info.value, AdapterError)
    assert len(str(info.value)) < 300  # a 300-character id is cut in the message


@pytest.mark.parametrize("adapter_id", ["../x", "a/b", "", "x" * 300, "..", "/tmp/evil"])
def test_store_refuses_invalid_ids_everywhere(tmp_path, adapter_id):
    root = tmp_path / "uploads"
    store = make_store(upload_root=root, max_slots=2)
    store.start(run_loader=False)
    config, weights = adapter_files()
    source = write_adapter(tmp_path, "src")
    calls = [
        lambda: store.upload(adapter_id, config, weights),
        lambda: store.upload_directory(adapter_id, source),
        lambda: store.register_directory(adapter_id, source),
        lambda: store.info(adapter_id),
        lambda: store.delete(adapter_id),
        lambda: store.pin_permanent(adapter_id),
        lambda: store.unpin_permanent(adapter_id),
    ]
    for call in calls:
        with pytest.raises(InvalidAdapterId):
            call()
    # The engine-facing methods never raise: the id is simply not there.
    assert store.load_error(adapter_id).startswith("invalid adapter id")
    assert not store.is_resident(adapter_id)
    assert store.pin(adapter_id) is None
    store.prefetch(adapter_id)
    assert store.drain() == 0
    # Nothing was written anywhere but the (empty) staging area.
    assert sorted(p.name for p in root.iterdir()) == [".staging"]
    assert list((root / ".staging").iterdir()) == []
    assert not (tmp_path / "x").exists() and not (tmp_path / "evil").exists()


def test_scan_skips_folders_that_are_not_ids(tmp_path):
    root = tmp_path / "adapters"
    write_adapter(root, "good")
    write_adapter(root, "bad name")
    write_adapter(root, ".hidden")
    (root / "a-file").write_text("not an adapter")
    store = make_store(root)
    store.start(run_loader=False)
    assert [info.adapter_id for info in store.list()] == ["good"]
    assert store.load_error("bad name").startswith("invalid adapter id")
