"""The CPU LoRA path at decode shapes: which implementation is fastest on this machine.

    python -m bench.bench_lora_bf16 [--repeats 30] [--threads 2] [--out PATH]

One "layer" = the four adapted calls of a SmolLM2-135M layer (qkv 576 -> 576+192+192,
o 576 -> 576, gate_up 576 -> 1536+1536, down 1536 -> 576), 8 adapters of ranks 8/16/32
(unpadded: 8, 16, 32, 8, 16, 32, 8, 16 in 8 slots of max rank 32), each request one token,
tokens sorted by adapter (segments of num_tokens / 8). Candidates:

  c_bf16_native     loramux_kernels/cpu/sgmv_bf16.c built for this CPU (AVX512-BF16 where present)
  c_bf16_portable   the same file built with -mno-avx512bf16 (what a CPU without it gets)
  torch_bf16        torch matmuls per segment in bf16 (oneDNN; AMX tiles where present)
  c_fp32            loramux_kernels/cpu/sgmv.c on fp32 activations and buffers (today's fp32 path)
  torch_fp32        torch matmuls per segment in fp32

A second table times one long segment (prefill) per length, C bf16 kernel against torch
bf16, to check where LONG_SEGMENT_TOKENS should send segments to torch. Results go to
bench/results/bench_lora_bf16.json with the CPU flags; the last line names the fastest.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.common import write_result
from loramux.kernels.buffers import LoraModuleBuffers
from loramux.kernels.cpu_backend import CpuLoraBackend
from loramux.kernels.cpu_build import load_kernel_library
from loramux.kernels.metadata import build_lora_batch_info
from loramux.kernels.torch_backend import TorchLoraBackend
from loramux.server.dtype_choice import cpu_flags

HIDDEN, KV, INTERMEDIATE = 576, 192, 1536
PROJECTIONS = {  # name -> (in_features, output slice widths)
    "qkv": (HIDDEN, (HIDDEN, KV, KV)),
    "o": (HIDDEN, (HIDDEN,)),
    "gate_up": (HIDDEN, (INTERMEDIATE, INTERMEDIATE)),
    "down": (INTERMEDIATE, (HIDDEN,)),
}
NUM_ADAPTERS = 8
RANKS = [(8, 16, 32)[i % 3] for i in range(NUM_ADAPTERS)]
MAX_RANK = 32
TOKEN_COUNTS = (16, 32, 64)
PREFILL_LENGTHS = (4, 8, 16, 24, 32, 48, 64, 128)
FLAGS_OF_INTEREST = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8", "avx2", "fma")


def make_layer(dtype: torch.dtype, seed: int = 0) -> dict[str, list[LoraModuleBuffers]]:
    gen = torch.Generator().manual_seed(seed)
    layer = {}
    for name, (in_features, widths) in PROJECTIONS.items():
        slices = []
        for width in widths:
            buffers = LoraModuleBuffers(NUM_ADAPTERS, MAX_RANK, in_features, width, dtype, "cpu")
            for slot, rank in enumerate(RANKS):
                a = torch.randn(rank, in_features, generator=gen) * 0.05
                b = torch.randn(width, rank, generator=gen) * 0.05
                buffers.write(slot, a.to(dtype), b.to(dtype), scaling=2.0)
            slices.append(buffers)
        layer[name] = slices
    return layer


def time_layer(backend, layer, info, dtype, repeats: int) -> float:
    """Best (min) seconds of the four calls of one layer over `repeats` samples of 5 runs:
    on a shared machine the minimum is the figure least disturbed by other jobs."""
    gen = torch.Generator().manual_seed(1)
    xs = {name: torch.randn(info.num_tokens, in_f, generator=gen).to(dtype) for name, (in_f, _) in PROJECTIONS.items()}
    ys = {name: torch.zeros(info.num_tokens, sum(w), dtype=dtype) for name, (_, w) in PROJECTIONS.items()}

    prepare = getattr(backend, "prepare", None)  # backends with a per-step prepare(info)
    if prepare is not None:
        prepare(info)

    def run() -> None:
        for name, slices in layer.items():
            backend.add_lora(ys[name], xs[name], slices, info)

    for _ in range(3):
        run()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(5):
            run()
        samples.append((time.perf_counter() - started) / 5)
    return min(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = Path(tempfile.mkdtemp(prefix="loramux-bench-kernels-"))
    native = load_kernel_library("sgmv_bf16", cache)
    candidates = {
        "c_bf16_native": (CpuLoraBackend(native, args.threads, torch.bfloat16), torch.bfloat16),
        "c_bf16_portable": (
            CpuLoraBackend(load_kernel_library("sgmv_bf16", cache, ("-mno-avx512bf16",)), args.threads, torch.bfloat16),
            torch.bfloat16,
        ),
        "torch_bf16": (TorchLoraBackend(), torch.bfloat16),
        "c_fp32": (CpuLoraBackend(load_kernel_library("sgmv", cache), args.threads, torch.float32), torch.float32),
        "torch_fp32": (TorchLoraBackend(), torch.float32),
    }
    layers = {dtype: make_layer(dtype) for dtype in (torch.float32, torch.bfloat16)}
    decode: dict[str, dict[str, float]] = {}
    for num_tokens in TOKEN_COUNTS:
        per = num_tokens // NUM_ADAPTERS
        info = build_lora_batch_info(list(range(NUM_ADAPTERS)), [per] * NUM_ADAPTERS)
        row = {}
        for name, (backend, dtype) in candidates.items():
            row[name] = time_layer(backend, layers[dtype], info, dtype, args.repeats) * 1e6
        decode[str(num_tokens)] = row
        print(f"decode T={num_tokens:3d}: " + "  ".join(f"{k} {v:7.1f} us" for k, v in row.items()), flush=True)
    # One segment of L tokens, C kernel vs torch (both bf16): the threshold to torch.
    prefill: dict[str, dict[str, float]] = {}
    c_bf16 = candidates["c_bf16_native"][0]
    for length in PREFILL_LENGTHS:
        info = build_lora_batch_info([2], [length])
        row = {
            "c_bf16_native": time_c_only(c_bf16, layers[torch.bfloat16], info, args.repeats) * 1e6,
            "torch_bf16": time_layer(TorchLoraBackend(), layers[torch.bfloat16], info, torch.bfloat16, args.repeats)
            * 1e6,
        }
        prefill[str(length)] = row
        print(f"one segment L={length:3d}: " + "  ".join(f"{k} {v:7.1f} us" for k, v in row.items()), flush=True)
    flags = sorted(cpu_flags())
    bf16_names = ("c_bf16_native", "c_bf16_portable", "torch_bf16")
    fastest = {t: min(bf16_names, key=lambda n: row[n]) for t, row in decode.items()}
    payload = {
        "unit": "microseconds per layer (4 adapted projections), best of repeats x 5 runs",
        "shapes": {k: {"in": v[0], "out": list(v[1])} for k, v in PROJECTIONS.items()},
        "ranks": RANKS,
        "threads": args.threads,
        "dpbf16_in_native_build": bool(native.lora_sgmv_bf16_uses_dpbf16()),
        "decode": decode,
        "one_segment": prefill,
        "fastest_bf16_at_decode": fastest,
        "cpu_flags_of_interest": [f for f in FLAGS_OF_INTEREST if f in flags],
        "lscpu_flags": flags,
        "note": "measured on a shared machine (other jobs load the CPU): figures are noisy",
    }
    path = write_result("bench_lora_bf16", payload) if args.out is None else _write(args.out, payload)
    print(f"wrote {path}")
    t = str(TOKEN_COUNTS[-1])
    print(
        "bench-lora-bf16: fastest="
        + ",".join(f"T{k}:{v}" for k, v in fastest.items())
        + f" c_bf16_native_us={decode[t]['c_bf16_native']:.0f} torch_bf16_us={decode[t]['torch_bf16']:.0f}"
        + f" c_fp32_us={decode[t]['c_fp32']:.0f} (T={t})"
    )
    return 0


def time_c_only(backend: CpuLoraBackend, layer, info, repeats: int) -> float:
    """The C kernel on every segment, however long (the backend's split to torch is off;
    each length is a new info, so the backend plans it anew with the threshold off)."""
    saved = backend.long_segment_tokens
    backend.long_segment_tokens = 1 << 30
    try:
        return time_layer(backend, layer, info, torch.bfloat16, repeats)
    finally:
        backend.long_segment_tokens = saved


def _write(path: Path, payload: dict) -> Path:
    import json

    path.write_text(json.dumps(payload, indent=1))
    return path


if __name__ == "__main__":
    raise SystemExit(main())
