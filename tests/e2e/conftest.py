"""End-to-end fixtures: real `loramux serve` processes on 127.0.0.1 and the files they serve.

One tiny-model server (random 2-layer Llama with the default model's tokenizer, random
PEFT adapters, API keys) is shared by the whole session; the default model's server lives
in its own module. Expected outputs come from an offline engine built in this process with
the same model and adapters (server.builder.build_engine + OfflineEngine), never from the
server itself.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from loramux.adapter_store.config import AdapterStoreConfig
from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.builder import EngineParts, build_engine
from loramux.server.config import CacheConfig, LoramuxConfig, LoraSlotsConfig, ModelConfig
from loramux.server.model_fetch import default_model_dir, is_complete
from loramux.server.offline import OfflineEngine, OfflineRequest
from loramux.server.outputs import CompletedRequest
from tests.peft_adapters import AdapterRecipe, make_peft_adapter
from tests.tiny_models import save_tiny_model

REPO = Path(__file__).resolve().parents[2]
TINY_NAME = "tiny-llama"
API_KEY = "user-key-e2e"
ADMIN_KEY = "admin-key-e2e"
MAX_LORA_RANK = 16
MAX_LORAS = 4
MAX_MODEL_LEN = 1024
MAX_UPLOAD_BYTES = 1 << 20  # the tiny adapters are ~60 KB; the too-large case sends 2 MiB
STARTUP_TIMEOUT_S = 180.0


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path
    api_key: str | None = None
    admin_key: str | None = None
    extra: dict = field(default_factory=dict)

    def headers(self, admin: bool = False) -> dict[str, str]:
        key = self.admin_key if admin else self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def client(self, admin: bool = False, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(admin), timeout=60.0, **kwargs)

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]


def start_server(args: list[str], log_path: Path, api_key: str | None = None,
                 admin_key: str | None = None, env: dict[str, str] | None = None,
                 module: str = "loramux.server.cli") -> Server:
    """`python -m MODULE serve ARGS --port P`; returns once /health answers 200. `env` adds
    environment variables; `module` swaps the entry point (tests/e2e/fault_server.py)."""
    port = free_port()
    env = {**os.environ, "LORAMUX_HOME": str(log_path.parent / "home"), "PYTHONUNBUFFERED": "1", **(env or {})}
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", module, "serve", "--host", "127.0.0.1", "--port", str(port),
         "--dtype", "float32", *args],  # fp32: compared exactly with the fp32 reference (args may override)
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    server = Server(f"http://127.0.0.1:{port}", process, log_path, api_key, admin_key)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    stop_server(server)
    raise RuntimeError(f"the server did not become healthy in {STARTUP_TIMEOUT_S} s:\n{server.log()}")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(5)


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class TinyFiles:
    model: Path
    adapters: Path  # --adapter-dir: alpha, beta
    spare: Path  # good adapters outside --adapter-dir: gamma, gamma-v2
    bad: Path  # adapters the server must refuse: rank32, wrong-shape
    uploads: Path  # --upload-dir


@pytest.fixture(scope="session")
def tokenizer():
    path = default_model_dir()
    if not is_complete(path):
        pytest.skip("the default model is not fetched (run `loramux fetch-model`)")
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory, tokenizer) -> TinyFiles:
    root = tmp_path_factory.mktemp("e2e-tiny")
    files = TinyFiles(root / "model", root / "adapters", root / "spare", root / "bad", root / "uploads")
    hf = save_tiny_model(files.model, "llama", vocab_size=len(tokenizer), max_position_embeddings=MAX_MODEL_LEN)
    tokenizer.save_pretrained(files.model)
    warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)  # peft on transformers 5
    for directory, recipes in (
        (files.adapters, [AdapterRecipe("alpha", 8, seed=1, b_std=0.2), AdapterRecipe("beta", 4, seed=2, b_std=0.2)]),
        (files.spare, [AdapterRecipe("gamma", 8, seed=3, b_std=0.2), AdapterRecipe("gamma-v2", 8, seed=4, b_std=0.2)]),
        (files.bad, [AdapterRecipe("rank32", 32, seed=5, b_std=0.2)]),
    ):
        directory.mkdir()
        for recipe in recipes:
            make_peft_adapter(hf, recipe, directory)
    # Same module names, other shapes: an adapter trained for a different base model.
    other = save_tiny_model(root / "other-model", "llama", hidden_size=32, intermediate_size=48,
                            vocab_size=128, max_position_embeddings=256)
    make_peft_adapter(other, AdapterRecipe("wrong-shape", r=8, seed=6, b_std=0.2), files.bad)
    files.uploads.mkdir()
    return files


def tiny_server_args(files: TinyFiles) -> list[str]:
    return [
        "--model", str(files.model), "--served-model-name", TINY_NAME,
        "--adapter-dir", str(files.adapters), "--upload-dir", str(files.uploads),
        "--max-loras", str(MAX_LORAS), "--max-lora-rank", str(MAX_LORA_RANK),
        "--kv-cache-bytes", "32M", "--max-model-len", str(MAX_MODEL_LEN),
        "--max-upload-bytes", str(MAX_UPLOAD_BYTES), "--threads", "2",
        "--api-key", API_KEY, "--admin-api-key", ADMIN_KEY, "--log-level", "warning",
    ]


@pytest.fixture(scope="session")
def tiny_server(tiny_files, tmp_path_factory):
    """The shared tiny-model server: alpha and beta from --adapter-dir, uploads on, API keys."""
    log_path = tmp_path_factory.mktemp("e2e-logs") / "tiny-server.log"
    server = start_server(tiny_server_args(tiny_files), log_path, API_KEY, ADMIN_KEY)
    yield server
    stop_server(server)


# --------------------------------------------------------------------------- reference


class Reference:
    """The engine's own greedy (or seeded) outputs, computed offline in this process."""

    def __init__(self, parts: EngineParts) -> None:
        self.parts = parts
        self.engine = OfflineEngine(parts.core)
        self.tokenizer = parts.tokenizer

    def chat_ids(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def prompt_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def run(self, requests: list[tuple[list[int], str | None, dict]]) -> list[CompletedRequest]:
        """(prompt ids, adapter or None, SamplingParams fields) -> completed requests."""
        results = self.engine.generate(
            [OfflineRequest(ids, SamplingParams(**params), adapter) for ids, adapter, params in requests]
        )
        for result in results:
            assert result.error is None, result.error
        return results

    def greedy(self, ids: list[int], adapter: str | None, max_tokens: int, **params) -> CompletedRequest:
        return self.run([(ids, adapter, {"max_tokens": max_tokens, "temperature": 0.0, **params})])[0]


def build_reference(model: Path, adapter_dirs: tuple[Path, ...], name: str,
                    kv_cache_bytes: int = 32 << 20) -> Reference:
    config = LoramuxConfig(
        model=ModelConfig(model_dir=model, served_model_name=name, max_model_len=MAX_MODEL_LEN, num_threads=2,
                          dtype="float32"),
        lora=LoraSlotsConfig(max_loras=MAX_LORAS, max_lora_rank=MAX_LORA_RANK),
        cache=CacheConfig(kv_cache_bytes=kv_cache_bytes),
        adapters=AdapterStoreConfig(adapter_dirs=adapter_dirs),
    )
    return Reference(build_engine(config))


@pytest.fixture(scope="session")
def tiny_reference(tiny_files) -> Reference:
    """Offline engine on the tiny model with alpha, beta, gamma and gamma-v2 registered."""
    reference = build_reference(tiny_files.model, (tiny_files.adapters, tiny_files.spare), TINY_NAME)
    yield reference
    reference.parts.close()
    torch.set_num_threads(min(2, torch.get_num_threads()))


# --------------------------------------------------------------------------- helpers


def copy_adapter(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(source / name, target / name)
    return target
