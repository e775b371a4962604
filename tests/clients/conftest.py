"""Client test fixtures: one fake server for the session, its state reset for every test."""

from __future__ import annotations

import json
import os

import pytest

from tests.clients.fake_server import FakeState, ServerThread, create_fake_app


@pytest.fixture(scope="session")
def _served() -> tuple[str, FakeState]:
    state = FakeState()
    with ServerThread(create_fake_app(state)) as server:
        yield server.url, state


@pytest.fixture
def fake(_served) -> FakeState:
    _url, state = _served
    state.reset()
    return state


@pytest.fixture
def url(_served, fake) -> str:
    return _served[0]


@pytest.fixture
def adapter_dir(tmp_path):
    """A directory holding a (fake) PEFT adapter's two files; the weights use every byte value."""
    directory = tmp_path / "my-adapter"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    (directory / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 8 + os.urandom(64))
    return directory
