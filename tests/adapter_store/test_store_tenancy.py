"""Tenancy in the store: ids that differ only in case never share upload files, and the
errors clients see name the user's file, never a path on the server."""

from __future__ import annotations

import json

import pytest

from loramux.adapter_store.errors import AdapterIdConflict, AdapterInvalid, AdapterNotFound
from loramux.adapter_store.format import CONFIG_NAME
from tests.adapter_store.store_fixtures import adapter_files, make_store, write_adapter


@pytest.fixture
def store(tmp_path):
    store = make_store(None, upload_root=tmp_path / "uploads")
    store.start(run_loader=False)
    yield store
    store.close()


def test_ids_that_differ_only_in_case_cannot_both_be_uploaded(store, tmp_path):
    config, weights = adapter_files(seed=1)
    assert store.upload("Tenant-A", config, weights).version == 1
    with pytest.raises(AdapterIdConflict, match="differ only in case"):
        store.upload("tenant-a", config, weights)
    with pytest.raises(AdapterNotFound):
        store.info("tenant-a")
    # The first id's files are untouched, and it can still be replaced under its own spelling.
    assert [p.name for p in (tmp_path / "uploads").iterdir() if not p.name.startswith(".")] == ["Tenant-A"]
    assert store.upload("Tenant-A", *adapter_files(seed=2)).version == 2
    assert list((tmp_path / "uploads" / ".staging").iterdir()) == []
    # Once deleted, the other spelling is free.
    store.delete("Tenant-A")
    assert store.upload("tenant-a", config, weights).version == 1


def test_upload_errors_carry_no_server_paths(store, tmp_path):
    config, weights = adapter_files()
    bad_config = json.dumps({**json.loads(config), "r": 0}).encode()
    with pytest.raises(AdapterInvalid) as info:
        store.upload("bad", bad_config, weights)
    message = info.value.public_message()
    assert str(tmp_path) not in message and CONFIG_NAME in message and "'r'" in message


def test_load_errors_shown_to_requests_carry_no_server_paths(tmp_path):
    root = tmp_path / "adapters"
    directory = write_adapter(root, "broken")
    (directory / CONFIG_NAME).write_text(json.dumps({"r": 0}))
    store = make_store(root)
    store.start(run_loader=False)
    try:
        error = store.load_error("broken")
        assert error is not None and "'r'" in error and CONFIG_NAME in error
        assert str(tmp_path) not in error
        info = store.info("broken")
        assert str(tmp_path) not in info.error
    finally:
        store.close()


def test_public_message_scrubs_paths_quoted_in_the_reason():
    error = AdapterInvalid(
        "x", "/srv/secret/x/adapter_model.safetensors",
        "cannot read weights: [Errno 13] Permission denied: '/srv/secret/x/adapter_model.safetensors'",
    )
    message = error.public_message()
    assert "/srv/secret" not in message and "adapter_model.safetensors" in message
