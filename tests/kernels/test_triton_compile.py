"""The Triton kernels compiled for an H100 (sm_90) on any machine, GPU or not.

The interpreter runs the kernels' Python, not Triton's compiler: code that only the real
compiler rejects (say, a non-constexpr global read in a kernel), register spills and weight
loads that lose their 16-byte vectorization all pass under TRITON_INTERPRET=1. Triton's
compiler and its bundled ptxas need no GPU, so this test launches the public wrappers on
CPU tensors with the kernels swapped for recorders, then compiles every recorded launch
exactly as the JIT would specialize it on a GPU (argument alignment, constexprs, configs)
and checks the machine code. It runs in a subprocess without TRITON_INTERPRET; it skips
where this Triton has no NVIDIA backend or its internals differ from what it expects.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed")

pytestmark = pytest.mark.triton

REPO = Path(__file__).resolve().parents[2]
SKIP = 3  # exit status of the subprocess when it cannot run here


def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    if proc.returncode == SKIP:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    kernels = {row["kernel"] for row in rows}
    assert kernels == {"_sgmv_shrink_kernel", "_sgmv_expand_kernel", "_bgmv_shrink_kernel", "_bgmv_expand_kernel"}
    for row in rows:
        label = f"{row['kernel']} {row['dtype']} {row['constexprs']}"
        if row["stack"] is not None:
            assert row["stack"] == 0, f"{label}: {row['stack']} bytes of stack (register spills)"
        if row["aligned"] and row["dtype"] != "fp32":
            assert row["vector_accesses"] > 0, f"{label}: no 16-byte vector loads or stores"
            if row["kernel"].startswith("_sgmv"):
                assert row["scalar_16bit_accesses"] == 0, f"{label}: scalar 16-bit global loads or stores"
        if row["kernel"] == "_sgmv_shrink_kernel" and row["aligned"]:
            assert row["cp_async"] > 0, f"{label}: the K loop is not pipelined (no cp.async)"


# --- the subprocess --------------------------------------------------------------------------


def _record_launches():
    """Run the wrappers on CPU tensors with the kernels replaced by recorders."""
    import torch

    import loramux.kernels.triton.bgmv_expand as bgmv_expand_mod
    import loramux.kernels.triton.bgmv_shrink as bgmv_shrink_mod
    import loramux.kernels.triton.sgmv_expand as sgmv_expand_mod
    import loramux.kernels.triton.sgmv_shrink as sgmv_shrink_mod
    from loramux.kernels.buffers import LoraModuleBuffers
    from loramux.kernels.metadata import build_lora_batch_info
    from loramux.kernels.triton.common import LoraSliceTable

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    for module, name in (
        (sgmv_shrink_mod, "_sgmv_shrink_kernel"),
        (sgmv_expand_mod, "_sgmv_expand_kernel"),
        (bgmv_shrink_mod, "_bgmv_shrink_kernel"),
        (bgmv_expand_mod, "_bgmv_expand_kernel"),
    ):
        setattr(module, name, Recorder(getattr(module, name)))

    # (dtype, in_features, slice widths, max rank, aligned?)
    cases = [
        (torch.float16, 4096, [4096, 1024, 1024], 64, True),
        (torch.float16, 4096, [4096], 16, True),
        (torch.bfloat16, 4096, [4096, 1024, 1024], 64, True),
        (torch.float32, 4096, [4096], 64, True),
        (torch.float16, 200, [576, 200], 16, False),
    ]
    tables = []
    for dtype, in_features, widths, max_rank, aligned in cases:
        slices = [LoraModuleBuffers(2, max_rank, in_features, w, dtype, "cpu") for w in widths]
        table = LoraSliceTable.build(slices)
        assert table.aligned == aligned
        tables.append(table)
        for seq_lens in ([64], [8] * 8, [1] * 64):  # prefill-like, mixed, decode
            info = build_lora_batch_info([k % 2 for k in range(len(seq_lens))], seq_lens)
            x = torch.zeros(info.num_tokens, in_features, dtype=dtype)
            y = torch.zeros(info.num_tokens, table.total_out, dtype=dtype)
            h = sgmv_shrink_mod.sgmv_shrink(x, table, info)
            sgmv_expand_mod.sgmv_expand(y, h, table, info)
            h = bgmv_shrink_mod.bgmv_shrink(x, table, info.token_slots)
            scales = torch.ones(info.num_tokens) if len(seq_lens) == 8 else None  # both HAS_SCALES variants
            bgmv_expand_mod.bgmv_expand(y, h, table, info.token_slots, scales)
    return launches, tables


def _compile_all() -> list[dict]:
    import re
    import tempfile

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    launches, _tables = _record_launches()
    rows, seen = [], set()
    for kernel, args, kwargs in launches:
        dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.dtype != torch.int32 and a.dim() == 2)
        if "DOT_IN_FP32" in kwargs:  # on a GPU only fp32 takes the fp32 dot (see dot_in_fp32)
            kwargs = {**kwargs, "DOT_IN_FP32": dtype == torch.float32}
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
        key = (kernel.__name__, repr(signature), repr(sorted(constexprs.items())), repr(sorted(attrs.items())), repr(options))
        if key in seen:
            continue
        seen.add(key)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
        ptx = compiled.asm["ptx"]
        stack = None
        if cuobjdump.exists():
            with tempfile.TemporaryDirectory() as d:
                cubin = Path(d) / "k.cubin"
                cubin.write_bytes(compiled.asm["cubin"])
                usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True, text=True)
            match = re.search(r"STACK:(\d+)", usage.stdout)
            stack = int(match.group(1)) if match else None
        table_aligned = "WEIGHTS_ALIGNED" in kwargs and kwargs["WEIGHTS_ALIGNED"]
        rows.append(
            {
                "kernel": kernel.__name__,
                "dtype": str(dtype).removeprefix("torch.").replace("float", "fp").replace("bfp16", "bf16"),
                "constexprs": {kernel.arg_names[k[0]]: v for k, v in constexprs.items() if kernel.arg_names[k[0]].isupper()},
                "aligned": table_aligned,
                "stack": stack,
                "shared": compiled.metadata.shared,
                "cp_async": len(re.findall(r"cp\.async\.(?:ca|cg)", ptx)),
                # 8- and 16-byte accesses: vector loads / stores, or async copies to shared memory
                "vector_accesses": len(re.findall(r"(?:ld|st)\.global(?:\.[a-z]+)*\.v[24]", ptx))
                + len(re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*\],\s*(?:8|16|0x8|0x10)\b", ptx)),
                "scalar_16bit_accesses": len(re.findall(r"(?:ld|st)\.global(?:\.[a-z]+)*\.b16\b", ptx)),
            }
        )
    return rows


def _main() -> int:
    sys.path.insert(0, str(REPO))
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("TRITON_INTERPRET is set: the compiler is not used")
        return SKIP
    try:
        from triton.backends import backends
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import create_function_from_signature  # noqa: F401

        if "nvidia" not in backends:
            print("this Triton has no NVIDIA backend")
            return SKIP
    except ImportError as exc:
        print(f"this Triton's internals differ from what the sm_90 compile check expects: {exc}")
        return SKIP
    print(json.dumps(_compile_all()))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
