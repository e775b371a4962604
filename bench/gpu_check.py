"""`make gpu-check`: the CUDA paths checked in one go, for the day a GPU is lent.

    python -m bench.gpu_check [--budget-s 450] [--device cpu --small]

Runs in well under 8 minutes on one CUDA GPU, with no network (every model and adapter
is random and written to a temp dir; nothing is downloaded):
  1. the Triton kernel tests compiled for real (TRITON_INTERPRET=0): SGMV/BGMV kernels,
     the Triton LoRA backend, the paged decode kernel, the one-copy step upload;
  2. the runner on CUDA with the Triton LoRA and attention backends against the torch
     ones, fp32 and bf16: a random small Llama with 4 adapters of mixed ranks on all seven
     projections, a mixed batch (prefill, then decodes) teacher-forced on the same tokens;
     fp32 logits must agree to 2e-3 of their scale, bf16 to 5e-2, and the greedy choices
     in >= 99% (fp32) / 95% (bf16) of the positions;
  3. W16 throughput on a random-weight model of a 1B-class Llama shape (hidden 2048, 16
     layers, 32 heads / 8 KV heads, MLP 8192, vocab 32000) in bf16: 16 sequences of 128
     prompt tokens, 64 new tokens each, base-only and with 8 adapters (ranks 8/16/32, all
     seven projections) mixed; tok/s over prefill and decode.
Last line: `gpu-check: triton_tests=... runner_fp32=... runner_bf16=... w16_base=A w16_mixed8=B seconds=S device=D`
(A, B in tok/s);
exit 0 when every check passed. Without CUDA it prints why it skipped and exits 0.
--device cpu --small runs parts 2 and 3 on the CPU backends at a small shape (a smoke
test of this script itself; part 1 needs CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from loramux.adapter_store.device_slots import write_adapter_to_slot
from loramux.adapter_store.format import CONFIG_NAME, WEIGHTS_NAME, load_adapter
from loramux.kernels.attention.backend import select_attention_backend
from loramux.kernels.backend import select_backend
from loramux.scheduler.output import SchedulerOutput
from loramux.scheduler.request import Request
from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.models.loader import load_model
from loramux.server.runner.model_runner import ModelRunner

REPO = Path(__file__).resolve().parent.parent
TRITON_TESTS = (
    "tests/kernels/test_triton_kernels.py",
    "tests/kernels/test_triton_backend.py",
    "tests/kernels/test_triton_compile.py",
    "tests/kernels/test_triton_paged_decode.py",
    "tests/server/test_profiling.py",
)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SMALL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=1000)  # fmt: skip
ONE_B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=32000)  # fmt: skip
# Runner agreement (backend under test vs torch), as fractions of the logits' scale.
LOGIT_TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 5e-2}
MIN_GREEDY_AGREEMENT = {torch.float32: 0.99, torch.bfloat16: 0.95}


# --------------------------------------------------------------------------- random files


def write_random_llama(directory: Path, shape: dict, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Path:
    """config.json + model.safetensors of a random Llama (tied embeddings), made on `device`."""
    config = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim

    def rand(*size: int, std: float) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device=device) * std).to(dtype).cpu()

    tensors = {"model.embed_tokens.weight": rand(config.vocab_size, hidden, std=0.02),
               "model.norm.weight": torch.ones(hidden, dtype=dtype)}  # fmt: skip
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
              "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}  # fmt: skip
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        for name, (out_f, in_f) in shapes.items():
            part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            tensors[f"{p}{part}.{name}.weight"] = rand(out_f, in_f, std=in_f**-0.5)
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def write_random_adapter(directory: Path, spec, rank: int, seed: int) -> Path:
    """A PEFT LoRA adapter of `rank` on all seven projections of every layer."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": list(PROJECTIONS), "lora_dropout": 0.0, "bias": "none"}  # fmt: skip
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer, module in spec.modules():
        in_f, out_f = spec.module_shapes[module]
        name = f"base_model.model.{spec.module_name(layer, module)}"
        tensors[f"{name}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) * in_f**-0.5
        tensors[f"{name}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.02
    save_file(tensors, str(directory / WEIGHTS_NAME))
    return directory


def load_with_adapters(model_dir: Path, adapters: list[Path], dtype, device, lora: str, attention: str):
    model = load_model(
        model_dir, select_backend(device, dtype, name=lora), dtype=dtype, device=device, max_model_len=1024,
        max_lora_slots=max(1, len(adapters)), max_lora_rank=32, attention_backend=select_attention_backend(device, attention),
    )  # fmt: skip
    spec = model.spec.base_model_spec()
    for slot, directory in enumerate(adapters):
        write_adapter_to_slot(model.lora_buffers(), slot, load_adapter(directory.name, directory, spec, 32, dtype))
    return model


# --------------------------------------------------------------------------- stepping


@dataclass
class _Sequences:
    requests: list[Request]
    next_block: int = 0

    @classmethod
    def make(cls, prompts: list[list[int]], slots: list[int | None], max_new: int, block_size: int) -> _Sequences:
        seqs = cls([])
        for i, (prompt, slot) in enumerate(zip(prompts, slots)):
            request = Request(f"r{i}", list(prompt), SamplingParams(max_tokens=max_new))
            request.adapter_slot = slot
            needed = -(-(len(prompt) + max_new) // block_size)
            request.block_ids = list(range(seqs.next_block, seqs.next_block + needed))
            seqs.next_block += needed
            seqs.requests.append(request)
        return seqs

    def step(self, runner: ModelRunner) -> torch.Tensor:
        """One step of every sequence (its prefill, then one token): fp32 logits [n, vocab]."""
        num_tokens = [r.num_tokens - r.num_computed_tokens for r in self.requests]
        step = runner.prepare(SchedulerOutput(
            scheduled_requests=self.requests, num_scheduled_tokens=num_tokens,
            total_num_scheduled_tokens=sum(num_tokens),
        ))  # fmt: skip
        hidden = runner.forward(step)
        logits = runner.model.compute_logits(hidden[step.sample_rows])
        order = [step.requests[i].request_id for i in step.sample_indices]
        for index in step.sample_indices:
            step.requests[index].num_computed_tokens += step.num_tokens[index]
        by_id = dict(zip(order, logits))
        return torch.stack([by_id[r.request_id] for r in self.requests])

    def append(self, tokens: list[int]) -> None:
        for request, token in zip(self.requests, tokens):
            request.append_output(token)


def compare_runners(model_dir: Path, adapters: list[Path], dtype, device, lora: str, attention: str, steps: int = 6) -> dict:
    """The backends under test against the torch ones on the same teacher-forced tokens."""
    tested = ModelRunner(load_with_adapters(model_dir, adapters, dtype, device, lora, attention), 256, 16)
    reference = ModelRunner(load_with_adapters(model_dir, adapters, dtype, device, "torch", "torch"), 256, 16)
    gen = torch.Generator().manual_seed(1)
    vocab = tested.model.spec.vocab_size
    lengths = [5, 17, 33, 9, 1, 24, 40, 12]
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
    slots = [None if i % 3 == 2 else i % len(adapters) for i in range(len(prompts))]
    a = _Sequences.make(prompts, slots, steps, 16)
    b = _Sequences.make(prompts, slots, steps, 16)
    worst, agree, total = 0.0, 0, 0
    for _ in range(steps):
        la, lb = a.step(tested), b.step(reference)
        scale = lb.abs().max().item() or 1.0
        worst = max(worst, (la - lb).abs().max().item() / scale)
        agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
        total += la.shape[0]
        tokens = lb.argmax(-1).tolist()  # both follow the reference's choices
        a.append(tokens)
        b.append(tokens)
    agreement = agree / total
    ok = worst <= LOGIT_TOLERANCE[dtype] and agreement >= MIN_GREEDY_AGREEMENT[dtype]
    return {"max_rel_diff": worst, "greedy_agreement": agreement, "ok": ok}


def w16(model, new_tokens: int = 64, prompt_tokens: int = 128, mixed: bool = False) -> float:
    """tok/s of 16 sequences, prefill + `new_tokens` greedy steps each."""
    blocks_per_sequence = -(-(prompt_tokens + new_tokens) // 16)
    runner = ModelRunner(model, 16 * blocks_per_sequence, 16)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, model.spec.vocab_size, (prompt_tokens,), generator=gen).tolist() for _ in range(16)]
    slots = [i % 8 for i in range(16)] if mixed else [None] * 16
    seqs = _Sequences.make(prompts, slots, new_tokens, 16)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for _ in range(new_tokens):
        seqs.append(seqs.step(runner).argmax(-1).tolist())
    sync()
    return 16 * new_tokens / (time.perf_counter() - started)


# --------------------------------------------------------------------------- main


def run_triton_tests(timeout_s: float) -> tuple[str, bool]:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TRITON_TESTS],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return "timeout", False
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-200:]
    print(done.stdout[-3000:], flush=True)
    counts = dict((k, int(v)) for v, k in re.findall(r"(\d+) (passed|failed|error|errors|skipped)", tail))
    ok = done.returncode == 0 and counts.get("passed", 0) > 0
    return f"{'pass' if ok else 'FAIL'}({counts.get('passed', 0)}p/{counts.get('failed', 0)}f)", ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--small", action="store_true", help="the W16 part at a small shape (smoke test)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="time for the Triton tests at most")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: skipped: no CUDA device here (torch.cuda.is_available() is False); nothing was run")
        return 0
    device = torch.device(args.device)
    lora, attention = ("triton", "triton") if device.type == "cuda" else ("cpu", "cpu")
    results: dict[str, str] = {}
    ok = True
    if device.type == "cuda":
        results["triton_tests"], passed = run_triton_tests(args.budget_s)
        ok &= passed
    else:
        results["triton_tests"] = "skipped(cpu)"
    with tempfile.TemporaryDirectory(prefix="loramux-gpu-check-") as tmp:
        tmp = Path(tmp)
        small_dir = write_random_llama(tmp / "small", SMALL, torch.float32, device)
        spec = _spec_of(small_dir)
        adapters = [write_random_adapter(tmp / f"small-a{i}", spec, r, seed=i) for i, r in enumerate((4, 8, 16, 32))]
        for name, dtype in (("runner_fp32", torch.float32), ("runner_bf16", torch.bfloat16)):
            figures = compare_runners(small_dir, adapters, dtype, device, lora, attention)
            print(f"  {name}: {figures}", flush=True)
            results[name] = "pass" if figures["ok"] else f"FAIL(diff={figures['max_rel_diff']:.2e})"
            ok &= figures["ok"]
        shape = SMALL if args.small else ONE_B
        big_dir = write_random_llama(tmp / "w16", shape, torch.bfloat16, device)
        spec = _spec_of(big_dir)
        bench_adapters = [write_random_adapter(tmp / f"w16-a{i}", spec, r, seed=10 + i)
                          for i, r in enumerate((8, 16, 32, 8, 16, 32, 8, 16))]  # fmt: skip
        model = load_with_adapters(big_dir, bench_adapters, torch.bfloat16, device, lora, attention)
        new_tokens = 8 if args.small else 64
        w16(model, new_tokens=4, prompt_tokens=16, mixed=True)  # warm-up: compiles the kernels
        results["w16_base"] = f"{w16(model, new_tokens):.1f}"
        results["w16_mixed8"] = f"{w16(model, new_tokens, mixed=True):.1f}"
    seconds = time.perf_counter() - started
    line = " ".join(f"{k}={v}" for k, v in results.items())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu-check: {line} seconds={seconds:.0f} device={name.replace(' ', '_')}")
    return 0 if ok else 1


def _spec_of(model_dir: Path):
    """The adapter spec of a model directory, without loading its weights."""
    from loramux.server.models.registry import adapter_spec_for
    from loramux.server.models.spec import load_hf_config

    return adapter_spec_for(load_hf_config(model_dir))


if __name__ == "__main__":
    sys.exit(main())
