"""`loramux generate | chat | adapters ...` end to end against the fake server."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from loramux.clients.cli import adapter_table
from loramux.clients.types import AdapterInfo
from loramux.server.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("LORAMUX_URL", raising=False)
    monkeypatch.delenv("LORAMUX_API_KEY", raising=False)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate(url, fake, capsys):
    fake.add_adapter("sql")
    rc, out, err = cli(capsys, "generate", "a b", "--url", url, "--adapter", "sql", "--max-tokens", "2",
                       "--temperature", "0.7", "--stop", "\n", "--details")
    assert (rc, out) == (0, " sql0 sql1\n")
    assert err.startswith("finish_reason=length prompt_tokens=2 generated_tokens=2 request_id=req-")
    body = json.loads(fake.requests[-1]["body"])
    assert body["parameters"] == {"details": True, "max_new_tokens": 2, "temperature": 0.7, "stop": ["\n"],
                                  "adapter_id": "sql"}


def test_generate_stream_from_stdin(url, fake, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("piped prompt\n"))
    rc, out, _ = cli(capsys, "generate", "-", "--url", url, "--stream", "--max-tokens", "3")
    assert (rc, out) == (0, " base0 base1 base2\n")
    assert json.loads(fake.requests[-1]["body"])["inputs"] == "piped prompt"


def test_chat_and_chat_stream(url, fake, capsys):
    fake.add_adapter("support")
    rc, out, err = cli(capsys, "chat", "hello", "--url", url, "--adapter", "support", "--system", "be brief",
                       "--max-tokens", "2", "--details")
    assert (rc, out) == (0, " support0 support1\n")
    assert err == "finish_reason=length prompt_tokens=5 completion_tokens=2\n"
    body = json.loads(fake.requests[-1]["body"])
    assert body["model"] == "support" and body["max_tokens"] == 2
    assert body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    rc, out, _ = cli(capsys, "chat", "hello", "--url", url, "--stream")
    assert (rc, out) == (0, " base0 base1 base2\n")


def test_adapters_upload_list_show_pin_unpin_rm(url, fake, capsys, adapter_dir, tmp_path):
    rc, out, _ = cli(capsys, "adapters", "upload", "from-dir", str(adapter_dir), "--url", url)
    assert (rc, out) == (0, "uploaded from-dir (version 1, rank 4, registered)\n")
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(adapter_dir, "inside")
    rc, out, _ = cli(capsys, "adapters", "upload", "from-tar", str(archive), "--url", url)
    assert rc == 0 and out.startswith("uploaded from-tar")

    rc, out, _ = cli(capsys, "adapters", "pin", "from-tar", "--url", url)
    assert (rc, out) == (0, "pinned from-tar (tier device)\n")
    rc, out, _ = cli(capsys, "adapters", "list", "--url", url)
    lines = out.splitlines()
    assert rc == 0 and lines[0].split() == ["ID", "VERSION", "STATUS", "TIER", "RANK", "SIZE", "PINNED",
                                            "RUNNING", "TARGETS"]
    assert lines[1].split() == ["from-dir", "1", "registered", "disk", "4", "2.1", "KiB", "no", "0",
                                "q_proj,v_proj"]
    assert lines[2].split()[:4] == ["from-tar", "1", "registered", "device"] and "yes" in lines[2].split()
    rc, out, _ = cli(capsys, "adapters", "list", "--json", "--url", url)
    assert [a["id"] for a in json.loads(out)] == ["from-dir", "from-tar"]

    rc, out, _ = cli(capsys, "adapters", "show", "from-tar", "--url", url)
    assert rc == 0 and "pinned:           True" in out and "target_modules:   q_proj, v_proj" in out
    rc, out, _ = cli(capsys, "adapters", "show", "from-tar", "--json", "--url", url)
    assert json.loads(out)["target_modules"] == ["q_proj", "v_proj"]
    rc, out, _ = cli(capsys, "adapters", "unpin", "from-tar", "--url", url)
    assert (rc, out) == (0, "unpinned from-tar (tier device)\n")

    rc, out, _ = cli(capsys, "adapters", "rm", "from-dir", "from-tar", "--url", url)
    assert (rc, out) == (0, "deleted from-dir\ndeleted from-tar\n")
    rc, out, _ = cli(capsys, "adapters", "list", "--url", url)
    assert (rc, out) == (0, "no adapters\n")


def test_env_is_read_when_the_command_runs(url, fake, capsys, monkeypatch):
    fake.admin_key = "sekrit"
    rc, _, err = cli(capsys, "adapters", "list", "--url", url)
    assert rc == 1 and "HTTP 401" in err
    monkeypatch.setenv("LORAMUX_URL", url)  # after server.cli was imported and a parser built
    monkeypatch.setenv("LORAMUX_API_KEY", "sekrit")
    rc, out, _ = cli(capsys, "adapters", "list")
    assert (rc, out) == (0, "no adapters\n")
    assert fake.requests[-1]["headers"]["authorization"] == "Bearer sekrit"
    rc, _, err = cli(capsys, "adapters", "list", "--api-key", "wrong")  # the flag wins over the env
    assert rc == 1 and "HTTP 401" in err


@pytest.mark.parametrize("argv, expected", [
    (["adapters", "show", "nope"], "loramux: error: adapter 'nope' is not registered (HTTP 404, request req-"),
    (["adapters", "rm", "nope"], "loramux: error: adapter 'nope' is not registered (HTTP 404"),
    (["generate", "raise:429"], "loramux: error: forced error 429 (HTTP 429"),
    (["chat", "hi", "--adapter", "raise:422"], "loramux: error: forced error 422 (HTTP 422"),
    (["generate", "hi", "--adapter", "nope", "--stream"], "loramux: error: adapter 'nope' is not registered"),
    (["adapters", "upload", "x", "/no/such/dir"], "loramux: error: /no/such/dir does not exist"),
])
def test_errors_are_one_line_on_stderr(url, capsys, argv, expected):
    rc, out, err = cli(capsys, *argv, "--url", url)
    assert rc == 1 and out == ""
    assert err.startswith(expected) and err.count("\n") == 1


def test_stream_error_after_tokens(url, capsys):
    rc, out, err = cli(capsys, "generate", "fail-mid-stream", "--stream", "--url", url)
    assert (rc, out) == (1, " base0")
    assert err.startswith("loramux: error: the generation failed (HTTP 424")


def test_unreachable_server(capsys):
    rc, out, err = cli(capsys, "adapters", "list", "--url", "http://127.0.0.1:9", "--timeout", "2")
    assert rc == 1 and out == "" and err.startswith("loramux: error: cannot reach http://127.0.0.1:9")


def test_table_sizes_and_failed_adapters():
    table = adapter_table([
        AdapterInfo("big", 3, "device", "device", 64, ("q_proj",), 5 * 1024**3, pinned=True, running_requests=2),
        AdapterInfo("broken", 1, "failed", "disk", None, (), None, error_type="AdapterInvalid"),
    ])
    rows = [line.split() for line in table.splitlines()[1:]]
    assert rows[0] == ["big", "3", "device", "device", "64", "5.0", "GiB", "yes", "2", "q_proj"]
    assert rows[1] == ["broken", "1", "failed", "(AdapterInvalid)", "disk", "-", "-", "no", "0", "-"]


# --------------------------------------------------------------------------- no torch, no server internals


def _python(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAMUX_")}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60, **kwargs)


def test_cli_subprocess_never_imports_torch(url, fake):
    fake.add_adapter("listed")
    done = _python("-X", "importtime", "-m", "loramux.server.cli", "adapters", "list", "--url", url)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[1].split()[0] == "listed"
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "httpx" in imported
    heavy = {m for m in imported if m.split(".")[0] in {"torch", "numpy", "transformers", "safetensors",
                                                         "scheduler", "kernels", "adapter_store"}}
    assert not heavy


def test_client_package_imports_no_project_internals(url, fake):
    snippet = f"""
import sys
import loramux.clients, loramux.clients.cli
rooms = ("torch", "loramux.server", "loramux.scheduler", "loramux.kernels", "loramux.adapter_store")
assert not [m for m in sys.modules if m.split(".")[0] in rooms or ".".join(m.split(".")[:2]) in rooms], sorted(sys.modules)
from loramux.server.cli import main
assert main(["adapters", "list", "--url", {url!r}]) == 0
assert "torch" not in sys.modules
"""
    done = _python("-c", snippet)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == "no adapters\n"


def test_client_sources_import_only_stdlib_and_httpx():
    import ast

    allowed = set(sys.stdlib_module_names) | {"httpx", "loramux"}
    for path in (REPO / "clients").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
            if name.startswith("loramux."):
                assert name.startswith("loramux.clients"), f"{path.name} imports {name}"
