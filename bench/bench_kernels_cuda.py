"""Time the Triton LoRA kernels on a CUDA GPU, beside the torch backend doing the same op.

    python bench/bench_kernels_cuda.py [--dtype bf16] [--runs 25] [--quick] [--sweep] [--out PATH]

For each scenario (decode batch of 64 tokens / prefill of 4096 tokens, hidden 4096, ranks
16 / 64 / mixed 16+64 with max rank 64, 1 to 64 adapters; an o_proj-like single slice and
a GQA qkv-like fused projection 4096 -> 4096 + 1024 + 1024) it reports, per kernel:
  sgmv_shrink, sgmv_expand, bgmv_shrink, bgmv_expand     the Triton kernels alone
  torch_shrink, torch_expand                             the same halves as torch matmuls
  triton_add_lora, torch_add_lora                        the whole op through each backend
the median of --runs timings with CUDA events (L2 flushed before each run), TFLOP/s and
GB/s. FLOPs count adapted tokens at their own rank; bytes count what the op must move at
least: x, h (fp32) and y once, each adapter's weights once. `--sweep` also tries a small
grid of block sizes / split-K per kernel and reports the best (what an autotuner would
pick). Results go to bench/results/kernels_cuda.json (or --out).

Without CUDA it prints a message and exits 0 (the kernels are tested on the CPU under
TRITON_INTERPRET=1 by `make test-kernels`; timings need a GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from loramux.kernels.buffers import LoraModuleBuffers  # noqa: E402
from loramux.kernels.metadata import LoraBatchInfo, build_lora_batch_info  # noqa: E402
from loramux.kernels.torch_backend import TorchLoraBackend  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
HIDDEN = 4096
MODULES = {"o": (HIDDEN, [HIDDEN]), "qkv": (HIDDEN, [HIDDEN, 1024, 1024])}
MAX_SLOTS = 64


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    num_tokens: int
    num_seqs: int
    num_adapters: int
    ranks: tuple[int, ...]  # rank of adapter j is ranks[j % len(ranks)]

    @property
    def rank_label(self) -> str:
        return "/".join(map(str, self.ranks))


def scenarios(quick: bool) -> list[Scenario]:
    out = []
    adapters = (1, 8) if quick else (1, 8, 64)
    for rank in (16, 64):
        for n in adapters:
            out.append(Scenario(f"decode-{n}a-r{rank}", 64, 64, n, (rank,)))
        for n in adapters:
            out.append(Scenario(f"prefill-{n}a-r{rank}", 4096, max(n, 8), n, (rank,)))
    out.append(Scenario("decode-64a-r16/64", 64, 64, 64, (16, 64)))
    out.append(Scenario("prefill-8a-r16/64", 4096, 8, 8, (16, 64)))
    return out


def make_batch(s: Scenario, device) -> LoraBatchInfo:
    """num_seqs sequences of equal length, adapters spread evenly, sorted by slot."""
    per_seq = s.num_tokens // s.num_seqs
    slots = [seq * s.num_adapters // s.num_seqs for seq in range(s.num_seqs)]
    return build_lora_batch_info(slots, [per_seq] * s.num_seqs, device=device)


def make_slices(s: Scenario, module: str, dtype, device) -> list[LoraModuleBuffers]:
    in_features, widths = MODULES[module]
    max_rank = max(s.ranks)
    gen = torch.Generator(device=device).manual_seed(0)
    slices = []
    for width in widths:
        buffers = LoraModuleBuffers(MAX_SLOTS, max_rank, in_features, width, dtype, device)
        for slot in range(s.num_adapters):
            rank = s.ranks[slot % len(s.ranks)]
            a = torch.randn(rank, in_features, generator=gen, device=device, dtype=dtype) * 0.02
            b = torch.randn(width, rank, generator=gen, device=device, dtype=dtype) * 0.02
            buffers.write(slot, a, b, scaling=2.0)
        slices.append(buffers)
    return slices


def work(info: LoraBatchInfo, slices, dtype) -> dict[str, tuple[float, float]]:
    """(flops, bytes) of the shrink, the expand and the whole op."""
    elem = torch.empty((), dtype=dtype).element_size()
    in_features = slices[0].in_features
    indptr = info.seg_indptr_host
    flops_s = flops_e = h_elems = 0
    used = set()
    for i, slot in enumerate(info.slot_indices_host):
        n = indptr[i + 1] - indptr[i]
        if slot < 0 or n == 0:
            continue
        used.add(slot)
        for b in slices:
            r = b.ranks_host[slot]
            flops_s += 2 * n * in_features * r
            flops_e += 2 * n * r * b.out_features
            h_elems += n * r
    a_bytes = sum(b.ranks_host[w] * in_features * elem for w in used for b in slices)
    b_bytes = sum(b.ranks_host[w] * b.out_features * elem for w in used for b in slices)
    x_bytes = info.num_tokens * in_features * elem
    y_bytes = 2 * info.num_tokens * sum(b.out_features for b in slices) * elem
    shrink = (flops_s, x_bytes + a_bytes + 4 * h_elems)
    expand = (flops_e, 4 * h_elems + b_bytes + y_bytes)
    return {"shrink": shrink, "expand": expand, "add_lora": (flops_s + flops_e, x_bytes + a_bytes + b_bytes + y_bytes)}


class CudaTimer:
    """Median of `runs` CUDA-event timings, the L2 cache flushed before each run."""

    def __init__(self, runs: int, warmup: int = 3) -> None:
        self.runs, self.warmup = runs, warmup
        self._flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")

    def __call__(self, fn) -> float:  # milliseconds
        for _ in range(self.warmup):  # compiles on the first call
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.runs):
            self._flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_us_per_call(fn, calls: int = 50) -> float:
    """Host time of one call (launch overhead + checks), the GPU not waited for."""
    _sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    _sync()
    return elapsed / calls * 1e6


def torch_halves(info: LoraBatchInfo, slices):
    """The torch backend's two halves (loramux_kernels/torch_backend.py), timed on their own."""
    indptr = info.seg_indptr_host
    segs = [
        (indptr[i], indptr[i + 1], slot)
        for i, slot in enumerate(info.slot_indices_host)
        if slot >= 0 and indptr[i + 1] > indptr[i]
    ]

    def shrink(x):
        return [
            [x[s:e] @ b.lora_a[w, : b.ranks_host[w]].T if b.ranks_host[w] else None for b in slices] for s, e, w in segs
        ]

    def expand(y, hs):
        for (s, e, w), per_slice in zip(segs, hs):
            offset = 0
            for b, h in zip(slices, per_slice):
                if h is not None:
                    y[s:e, offset : offset + b.out_features].addmm_(h, b.lora_b[w, : b.ranks_host[w]])
                offset += b.out_features

    return shrink, expand


def sweep_configs(kernel: str, table, KernelConfig):
    if kernel.endswith("shrink"):
        ns = (16, 32, 64) if kernel.startswith("sgmv") else (16, 32)
        ks = (64, 128, 256)
        splits = (1, 2, 4, 8, 16)
        return [
            KernelConfig(block_n=n, block_k=k, split_k=sp, num_warps=w)
            for n in ns
            for k in ks
            for sp in splits
            for w in (4, 8)
        ]
    ns = (64, 128, 256) if kernel.startswith("sgmv") else (128, 256, 512)
    ks = (16, 32) if kernel.startswith("sgmv") else (16, 32, 64)
    return [KernelConfig(block_n=n, block_k=k, num_warps=w) for n in ns for k in ks for w in (4, 8)]


def bench_scenario(s: Scenario, module: str, dtype, timer, sweep: bool, device=None) -> dict:
    from loramux.kernels.triton.bgmv_expand import bgmv_expand
    from loramux.kernels.triton.bgmv_shrink import bgmv_shrink
    from loramux.kernels.triton.common import KernelConfig, LoraSliceTable, SgmvTiles
    from loramux.kernels.triton.sgmv_expand import sgmv_expand
    from loramux.kernels.triton.sgmv_shrink import sgmv_shrink
    from loramux.kernels.triton_backend import TritonLoraBackend

    device = torch.device("cuda") if device is None else device
    info = make_batch(s, device)
    slices = make_slices(s, module, dtype, device)
    table = LoraSliceTable.build(slices)
    tiles = SgmvTiles.build(info)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(info.num_tokens, table.in_features, generator=gen, device=device, dtype=dtype)
    y = torch.zeros(info.num_tokens, table.total_out, device=device, dtype=dtype)
    slots = info.token_slots
    h_sgmv = sgmv_shrink(x, table, info, tiles)
    h_bgmv = bgmv_shrink(x, table, slots)
    triton_backend, torch_backend = TritonLoraBackend(), TorchLoraBackend()
    t_shrink, t_expand = torch_halves(info, slices)
    h_torch = t_shrink(x)

    # Same answer from every path before timing anything.
    triton_backend.prepare(info)  # once per step, as the runner does
    ref = torch.zeros_like(y, dtype=torch.float32)
    torch_backend.add_lora(ref, x.float(), [_as_fp32(b) for b in slices], info)
    checks = {
        "sgmv": lambda out: sgmv_expand(out, h_sgmv, table, info, tiles),
        "bgmv": lambda out: bgmv_expand(out, h_bgmv, table, slots),
    }
    for name, expand in checks.items():
        out = torch.zeros_like(y)
        expand(out)
        err = (out.float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
        if err > 2e-2:
            raise RuntimeError(f"{name} disagrees with the torch backend on {s.name}/{module}: rel err {err:.3g}")

    ops = {
        "sgmv_shrink": ("shrink", lambda: sgmv_shrink(x, table, info, tiles)),
        "sgmv_expand": ("expand", lambda: sgmv_expand(y, h_sgmv, table, info, tiles)),
        "bgmv_shrink": ("shrink", lambda: bgmv_shrink(x, table, slots)),
        "bgmv_expand": ("expand", lambda: bgmv_expand(y, h_bgmv, table, slots)),
        "torch_shrink": ("shrink", lambda: t_shrink(x)),
        "torch_expand": ("expand", lambda: t_expand(y, h_torch)),
        "triton_add_lora": ("add_lora", lambda: triton_backend.add_lora(y, x, slices, info)),
        "torch_add_lora": ("add_lora", lambda: torch_backend.add_lora(y, x, slices, info)),
    }
    amounts = work(info, slices, dtype)
    row = {
        "scenario": s.name,
        "module": module,
        "num_tokens": info.num_tokens,
        "num_segments": info.num_segments,
        "max_seg_len": info.max_seg_len,
        "num_adapters": s.num_adapters,
        "ranks": s.rank_label,
        "triton_path": "bgmv" if triton_backend.step_plan(info).use_bgmv else "sgmv",
        "kernels": {},
    }
    for name, (kind, fn) in ops.items():
        ms = timer(fn)
        flops, nbytes = amounts[kind]
        row["kernels"][name] = {"ms": ms, "tflops": flops / ms / 1e9, "gbps": nbytes / ms / 1e6}
    row["host_us"] = {
        "triton_add_lora": host_us_per_call(ops["triton_add_lora"][1]),
        "torch_add_lora": host_us_per_call(ops["torch_add_lora"][1]),
    }
    if sweep:
        row["sweep"] = {}
        kernels = {
            "sgmv_shrink": lambda c: sgmv_shrink(x, table, info, tiles, config=c),
            "sgmv_expand": lambda c: sgmv_expand(y, h_sgmv, table, info, tiles, config=c),
            "bgmv_shrink": lambda c: bgmv_shrink(x, table, slots, config=c),
            "bgmv_expand": lambda c: bgmv_expand(y, h_bgmv, table, slots, config=c),
        }
        for name, fn in kernels.items():
            best = None
            for config in sweep_configs(name, table, KernelConfig):
                try:
                    ms = timer(lambda: fn(config))
                except Exception as exc:  # e.g. out of shared memory / registers
                    print(f"  {name} {config}: {type(exc).__name__}", file=sys.stderr)
                    continue
                if best is None or ms < best[0]:
                    best = (ms, config)
            if best is not None:
                row["sweep"][name] = {"ms": best[0], "config": dataclasses.asdict(best[1])}
    return row


def _as_fp32(b: LoraModuleBuffers) -> LoraModuleBuffers:
    out = LoraModuleBuffers(b.max_slots, b.max_rank, b.in_features, b.out_features, torch.float32, b.lora_a.device)
    out.lora_a.copy_(b.lora_a)
    out.lora_b.copy_(b.lora_b)
    out.ranks.copy_(b.ranks)
    out.ranks_host[:] = b.ranks_host
    return out


def print_row(row: dict) -> None:
    print(
        f"{row['scenario']:<22} {row['module']:<4} T={row['num_tokens']:<5} "
        f"segs={row['num_segments']:<3} -> {row['triton_path']}"
    )
    for name, k in row["kernels"].items():
        print(f"    {name:<16} {k['ms'] * 1e3:9.1f} us  {k['tflops']:7.2f} TFLOP/s  {k['gbps']:8.1f} GB/s")
    h = row["host_us"]
    print(f"    host per call: triton {h['triton_add_lora']:.1f} us, torch {h['torch_add_lora']:.1f} us")
    for name, best in row.get("sweep", {}).items():
        print(f"    best {name:<12} {best['ms'] * 1e3:9.1f} us  {best['config']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--runs", type=int, default=25)
    parser.add_argument("--quick", action="store_true", help="fewer scenarios (1 and 8 adapters)")
    parser.add_argument("--sweep", action="store_true", help="also search block sizes / split-K")
    parser.add_argument("--modules", nargs="+", choices=sorted(MODULES), default=["o", "qkv"])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "kernels_cuda.json")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_kernels_cuda: no CUDA device here, nothing to time (the Triton kernels are "
              "checked on the CPU by `make test-kernels`; run this on a GPU machine).")
        return 0
    try:
        import triton
    except ImportError:
        print("bench_kernels_cuda: Triton is not installed; nothing to time.")
        return 0

    dtype = DTYPES[args.dtype]
    timer = CudaTimer(args.runs)
    rows = []
    with torch.inference_mode():
        for s in scenarios(args.quick):
            for module in args.modules:
                row = bench_scenario(s, module, dtype, timer, args.sweep)
                print_row(row)
                rows.append(row)
    result = {
        "device": torch.cuda.get_device_name(),
        "sms": torch.cuda.get_device_properties(0).multi_processor_count,
        "dtype": args.dtype,
        "runs": args.runs,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
