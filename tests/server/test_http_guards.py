"""The HTTP layer's small guards, without a server: loopback names, the browser guard,
path redaction in errors, log escaping, keys from the environment."""

from __future__ import annotations

import pytest
from starlette.datastructures import Headers

from loramux.server.api.auth import browser_guard_error
from loramux.server.api.limits import escape_for_log
from loramux.server.api.redact import redact_paths
from loramux.server.config import ServerConfig, is_loopback_host


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST.", True), ("app.localhost", True), ("0.0.0.0", False), ("::", False), ("10.0.0.1", False),
    ("evil.example", False), ("localhost.evil.example", False), ("", False),
])
def test_loopback_names(host, loopback):
    assert is_loopback_host(host) is loopback


def test_keyless_management_only_on_loopback():
    assert ServerConfig(host="127.0.0.1").management_open_without_keys
    assert not ServerConfig(host="0.0.0.0").management_open_without_keys
    assert not ServerConfig(host="127.0.0.1", api_keys=("k",)).management_open_without_keys


@pytest.mark.parametrize("headers, refused", [
    ({"host": "127.0.0.1:8000"}, False),
    ({"host": "localhost:8000", "origin": "http://localhost:3000"}, False),
    ({"host": "[::1]:8000", "origin": "http://[::1]:8000"}, False),
    ({"host": "127.0.0.1:8000", "origin": "https://evil.example"}, True),
    ({"host": "127.0.0.1:8000", "origin": "null"}, True),
    ({"host": "127.0.0.1:8000", "origin": "http://127.0.0.1.evil.example"}, True),
    ({"host": "evil.example:8000"}, True),  # DNS rebinding: the page's own name
    ({}, True),
])
def test_browser_guard(headers, refused):
    assert (browser_guard_error(Headers(headers)) is not None) is refused


def test_redact_paths_keeps_routes_and_file_names():
    assert redact_paths("cannot read /srv/data/adapters/x/adapter_model.safetensors: truncated") == (
        "cannot read .../adapter_model.safetensors: truncated")
    assert redact_paths("upload one with POST /v1/adapters") == "upload one with POST /v1/adapters"
    assert "/home" not in redact_paths("[Errno 2] No such file or directory: '/home/u/.cache/loramux/x.json'")


def test_escape_for_log_keeps_one_line():
    escaped = escape_for_log("/a\nFAKE 200\r\x1b[31m\u202e", 100)
    assert "\n" not in escaped and "\r" not in escaped and "\x1b" not in escaped and "\u202e" not in escaped
    assert len(escape_for_log("x" * 10_000, 50)) <= 53


def test_keys_from_the_environment(monkeypatch):
    from loramux.server.cli import build_parser
    from loramux.server.serve import _keys

    monkeypatch.setenv("LORAMUX_API_KEY", "a, b")
    monkeypatch.setenv("LORAMUX_ADMIN_API_KEY", "admin")
    args = build_parser().parse_args(["serve", "--api-key", "c"])
    assert _keys(args.api_key, args.api_key_file, "LORAMUX_API_KEY") == ("c", "a", "b")
    assert _keys(args.admin_api_key, args.admin_api_key_file, "LORAMUX_ADMIN_API_KEY") == ("admin",)
