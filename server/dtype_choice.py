"""`--dtype auto`: the serving dtype this machine runs fastest, decided once at start-up.

CUDA: bf16. CPU: bf16 only where the CPU has native bf16 arithmetic (AVX512-BF16 or AMX)
*and* a short probe finds torch's bf16 linear of a decode shape faster than fp32's; else
fp32 (without native support, bf16 GEMMs are emulated and slower than fp32 ones). The
decision and its figures are logged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# CPU flags (as /proc/cpuinfo spells them) that give bf16 GEMMs native arithmetic.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# The probe: a decode-like linear, [PROBE_TOKENS, PROBE_IN] x [PROBE_IN, PROBE_OUT].
PROBE_TOKENS, PROBE_IN, PROBE_OUT = 16, 576, 1536
# bf16 must beat fp32 by this factor, so timing noise never flips a tie to the less
# accurate dtype.
PROBE_MARGIN = 1.1


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of this machine (empty where /proc/cpuinfo is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _linear_seconds(dtype: torch.dtype, repeats: int) -> float:
    """The best of `repeats` timings of a probe-shaped linear in `dtype`."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_TOKENS, PROBE_IN, generator=gen).to(dtype)
    w = torch.randn(PROBE_OUT, PROBE_IN, generator=gen).to(dtype)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(3):  # warm-up: oneDNN builds its kernels on the first calls
            torch.nn.functional.linear(x, w)
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(10):
                torch.nn.functional.linear(x, w)
            best = min(best, time.perf_counter() - started)
    return best / 10


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # "float32" | "bfloat16"
    reason: str  # one line for the log


def probe_cpu_dtype(flags: frozenset[str] | None = None, repeats: int = 5) -> DtypeChoice:
    """bf16 where native bf16 is present and measured faster than fp32, else fp32."""
    flags = cpu_flags() if flags is None else flags
    native = [f for f in NATIVE_BF16_FLAGS if f in flags]
    if not native:
        return DtypeChoice("float32", "the CPU has no native bf16 (no amx_bf16 / avx512_bf16)")
    fp32 = _linear_seconds(torch.float32, repeats)
    bf16 = _linear_seconds(torch.bfloat16, repeats)
    figures = (
        f"[{PROBE_TOKENS}, {PROBE_IN}] x [{PROBE_IN}, {PROBE_OUT}] linear: "
        f"fp32 {fp32 * 1e6:.0f} us, bf16 {bf16 * 1e6:.0f} us ({'/'.join(native)})"
    )
    if bf16 * PROBE_MARGIN < fp32:
        return DtypeChoice("bfloat16", f"bf16 is faster: {figures}")
    return DtypeChoice("float32", f"bf16 is not faster: {figures}")


def resolve_dtype(requested: str, device: str) -> str:
    """'auto' -> the dtype to serve in (logged); any other name is returned as it is."""
    if requested != "auto":
        return requested
    if torch.device(device).type == "cuda":
        choice = DtypeChoice("bfloat16", "CUDA device")
    else:
        choice = probe_cpu_dtype()
    logger.info("dtype auto -> %s: %s", choice.dtype, choice.reason)
    return choice.dtype
