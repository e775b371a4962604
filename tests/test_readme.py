"""Every command in README.md runs, against a real server started here.

The README's ```bash and ```python blocks run in order against one `loramux serve` on a
free 127.0.0.1 port, with the shipped demo adapters (examples/adapters) as its
--adapter-dir; "127.0.0.1:8000" in a block becomes that port. Bash blocks run under
`bash -euo pipefail` in the repository root with `loramux` on PATH (this interpreter) and
$LORAMUX_URL set; they must exit 0 and print something. Python blocks run in one shared
namespace (as pasted into one interpreter, one after the other) and must not raise.
A block preceded by `<!-- readme-test: skip ... -->` is not run (`make serve` itself); one
preceded by `<!-- readme-test: slow ... -->` runs in the slow suite (`make test-slow`).
Blocks that name a demo adapter are skipped, with the reason, when examples/adapters
lacks it (`make demo-adapters` makes them).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from loramux.server.model_fetch import default_model_dir
from tests.e2e.conftest import start_server, stop_server

pytestmark = pytest.mark.model

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
ADAPTER_DIR = REPO / "examples" / "adapters"
DEMO_ADAPTERS = ("pirate", "french", "json", "short")
README_ADDRESS = "127.0.0.1:8000"
SKIP_MARK = "<!-- readme-test: skip"
SLOW_MARK = "<!-- readme-test: slow"
BLOCK_TIMEOUT_S = 300

_FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    index: int
    language: str  # bash | python
    code: str
    skipped: bool  # marked <!-- readme-test: skip -->
    line: int
    slow: bool = False  # marked <!-- readme-test: slow -->

    @property
    def id(self) -> str:
        first = next((l for l in self.code.splitlines() if l.strip()), "")
        return f"{self.index}-{self.language}-line{self.line}:{first[:40]}"


def readme_blocks(text: str) -> list[Block]:
    blocks = []
    for match in _FENCE.finditer(text):
        language = match.group(1)
        if language not in ("bash", "sh", "python"):
            continue
        before = text[: match.start()].rstrip().splitlines()
        skipped = bool(before) and before[-1].strip().startswith(SKIP_MARK)
        line = text.count("\n", 0, match.start()) + 1
        slow = bool(before) and before[-1].strip().startswith(SLOW_MARK)
        blocks.append(Block(len(blocks), "python" if language == "python" else "bash", match.group(2),
                            skipped, line, slow))
    return blocks


BLOCKS = readme_blocks(README.read_text())


def test_readme_has_the_promised_examples():
    """The parser sees the blocks; the README shows each adapter, the upload and /metrics."""
    code = "\n".join(b.code for b in BLOCKS if not b.skipped)
    assert [b.code.split()[:2] for b in BLOCKS if b.skipped] == [["make", "serve"], ["make", "test"]]
    for needle in (*DEMO_ADAPTERS, "/v1/chat/completions", "/generate", "stream=True", "from openai",
                   "/v1/adapters", "adapters upload", "/metrics"):
        assert needle in code, needle


def missing_adapters() -> list[str]:
    return [a for a in DEMO_ADAPTERS if not (ADAPTER_DIR / a / "adapter_model.safetensors").exists()]


@pytest.fixture(scope="module")
def readme_server(tmp_path_factory):
    model = default_model_dir()
    if not (model / ".loramux-complete").exists():
        pytest.skip("the default model is not fetched (run `loramux fetch-model`)")
    root = tmp_path_factory.mktemp("readme")
    args = ["--model", str(model), "--upload-dir", str(root / "uploads"), "--max-loras", "8",
            "--kv-cache-bytes", "256M", "--max-model-len", "1024", "--threads", "2", "--log-level", "warning"]
    if ADAPTER_DIR.is_dir():
        args += ["--adapter-dir", str(ADAPTER_DIR)]
    server = start_server(args, root / "server.log")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def shell_env(readme_server, tmp_path_factory):
    """$PATH with a `loramux` that runs this interpreter's server.cli; $LORAMUX_URL."""
    bin_dir = tmp_path_factory.mktemp("readme-bin")
    for command, module in (("loramux", "loramux.server.cli"), ("loramux-ray", "loramux.ray_serve.cli")):
        shim = bin_dir / command
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n')
        shim.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "LORAMUX_URL": readme_server.url,
            "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def python_namespace():
    return {"__name__": "__readme__"}


@pytest.mark.parametrize("block", [pytest.param(b, marks=pytest.mark.slow) if b.slow else b
                                   for b in BLOCKS if not b.skipped], ids=lambda b: b.id)
def test_readme_block(block: Block, readme_server, shell_env, python_namespace):
    needed = [a for a in DEMO_ADAPTERS if re.search(rf"\b{a}\b", block.code)]
    absent = [a for a in needed if a in missing_adapters()]
    if absent:
        pytest.skip(f"the demo adapters {absent} are not in {ADAPTER_DIR} (run `make demo-adapters`)")
    address = readme_server.url.removeprefix("http://")
    code = block.code.replace(README_ADDRESS, address)
    if block.language == "bash":
        for tool in ("curl", "jq"):
            if re.search(rf"\b{tool}\b", code) and shutil.which(tool) is None:
                pytest.skip(f"{tool} is not installed")
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=REPO, env=shell_env,
                                capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
        print(result.stdout)
        assert result.returncode == 0, f"README line {block.line} failed:\n{result.stderr}\n{readme_server.log()}"
        assert result.stdout.strip(), f"README line {block.line} printed nothing:\n{result.stderr}"
        assert "null" not in result.stdout.split(), f"README line {block.line}: jq found no field\n{result.stdout}"
    else:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"README.md:{block.line}", "exec"), python_namespace)  # noqa: S102
        print(out.getvalue())
        assert out.getvalue().strip(), f"README line {block.line} printed nothing"
