"""deploy/ray without Ray: how the ingress reads the adapter of a request, and the shared
adapter directory (publish, replace, remove, replica records)."""

from __future__ import annotations

import json
import os

import pytest

from loramux.ray_serve.adapter_dir import SharedAdapterDir
from loramux.ray_serve.routing import MULTIPLEX_HEADER, adapter_for_request, wants_stream


@pytest.mark.parametrize("method,path,headers,body,expected", [
    ("POST", "/v1/chat/completions", {}, {"model": "pirate", "messages": []}, "pirate"),
    ("POST", "/v1/completions", {}, {"model": "base-model", "prompt": "x"}, ""),  # the base model
    ("POST", "/v1/completions", {}, {"prompt": "x"}, ""),
    ("POST", "/generate", {}, {"inputs": "x", "parameters": {"adapter_id": "french"}}, "french"),
    ("POST", "/generate_stream", {}, {"inputs": "x", "parameters": {"adapter_id": "json"}}, "json"),
    ("POST", "/", {}, {"inputs": "x", "parameters": {}}, ""),
    ("POST", "/generate", {}, {"inputs": "x", "parameters": "nonsense"}, ""),
    ("POST", "/v1/chat/completions", {MULTIPLEX_HEADER: "short"}, {"model": "pirate"}, "short"),  # Serve's header wins
    ("GET", "/v1/models", {}, None, ""),
    ("POST", "/v1/adapters", {}, None, ""),
    ("POST", "/v1/completions", {}, {"model": "x" * 300}, ""),  # too long to be an id: the replica refuses it
    ("POST", "/v1/completions", {}, {"model": "../../etc"}, ""),
    ("POST", "/v1/completions", {}, {"model": 7}, ""),
])
def test_adapter_for_request(method, path, headers, body, expected):
    raw = json.dumps(body).encode() if body is not None else b""
    assert adapter_for_request(method, path, headers, raw, "base-model") == expected


def test_bodies_that_are_not_json_route_as_base():
    assert adapter_for_request("POST", "/v1/completions", {}, b"\xff{not json", "b") == ""
    assert adapter_for_request("POST", "/generate", {}, b"[1, 2]", "b") == ""


def test_wants_stream():
    assert wants_stream("/generate_stream", b"")
    assert wants_stream("/v1/chat/completions", b'{"stream": true}')
    assert not wants_stream("/v1/chat/completions", b'{"stream": "yes"}')
    assert not wants_stream("/generate", b"junk")


def _adapter(tmp_path, name: str, payload: bytes) -> os.PathLike:
    source = tmp_path / "src" / name
    source.mkdir(parents=True)
    (source / "adapter_config.json").write_text("{}")
    (source / "adapter_model.safetensors").write_bytes(payload)
    return source


def test_publish_replace_remove(tmp_path):
    shared = SharedAdapterDir(tmp_path / "state").prepare()
    assert shared.snapshot() == {}
    shared.publish("my-adapter", _adapter(tmp_path, "v1", b"one"))
    first = shared.snapshot()
    assert set(first) == {"my-adapter"}
    assert (shared.adapters / "my-adapter" / "adapter_model.safetensors").read_bytes() == b"one"
    os.utime(shared.adapters / "my-adapter" / "adapter_model.safetensors", ns=(1, 1))
    shared.publish("my-adapter", _adapter(tmp_path, "v2", b"two"))
    assert (shared.adapters / "my-adapter" / "adapter_model.safetensors").read_bytes() == b"two"
    assert shared.snapshot()["my-adapter"] != 1  # a replacement changes the stamp replicas compare
    assert [p.name for p in shared.adapters.iterdir()] == ["my-adapter"]  # no staging or old copies left
    assert shared.remove("my-adapter") and shared.snapshot() == {}
    assert not shared.remove("my-adapter")


def test_ids_never_become_paths(tmp_path):
    shared = SharedAdapterDir(tmp_path / "state").prepare()
    for bad in ("../escape", "a/b", ".hidden", ""):
        assert shared.path(bad) is None
        with pytest.raises(ValueError):
            shared.publish(bad, _adapter(tmp_path, "x" + str(len(bad)), b"x"))
        assert not shared.remove(bad)
    (shared.adapters / ".staging-leftover").mkdir()
    (shared.adapters / "half-written").mkdir()  # no config yet: not an adapter
    assert shared.snapshot() == {}


def test_replica_records(tmp_path):
    shared = SharedAdapterDir(tmp_path / "state").prepare()
    shared.announce("r1", "http://127.0.0.1:1", os.getpid(), os.getpid())
    shared.announce("r2/../x", "http://127.0.0.1:2", 2 ** 22 + 12345, os.getpid())  # a pid that is not running
    assert [r["replica"] for r in shared.live_replicas()] == ["r1"]
    shared.withdraw("r1")
    assert shared.live_replicas() == []


@pytest.mark.parametrize("host,admin_key,open_", [
    ("127.0.0.1", None, True), ("localhost", None, True), ("::1", None, True),
    ("0.0.0.0", None, False), ("10.1.2.3", None, False), ("0.0.0.0", "secret-admin", True),
])
def test_front_door_management_follows_the_servers_rule(monkeypatch, host, admin_key, open_):
    """Management through the ingress: only with an admin key, or on a loopback front door."""
    from loramux.ray_serve import cli

    monkeypatch.delenv("LORAMUX_ADMIN_API_KEY", raising=False)
    if admin_key:
        monkeypatch.setenv("LORAMUX_ADMIN_API_KEY", admin_key)
    args, server_args = cli.build_parser().parse_known_args(["--host", host, "--model", "/m/my-model", "--threads", "1"])
    options = cli.options_from_args(args, server_args)
    assert options.management_open is open_
    assert options.base_model == "my-model"
    assert options.replica.server_args == ("--model", "/m/my-model", "--threads", "1")
    assert ("LORAMUX_ADMIN_API_KEY" in options.replica.env) is bool(admin_key)
    assert not any("secret" in a for a in options.replica.server_args)  # keys travel in the environment
