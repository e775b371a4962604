"""loramux_kernels/openmp.py: a thread set to one thread opens no worker pool, for torch's own
kernels and for its MKL matmuls; set wider, it does. Runs in a fresh interpreter, since
pools, once made, live as long as the process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import os
import torch
torch.set_num_threads(2)
from loramux.kernels.openmp import set_thread_openmp_threads

def threads():
    return len(os.listdir("/proc/self/task"))

assert set_thread_openmp_threads(1)
before = threads()
x = torch.randn(512, 512)
x @ x  # MKL sgemm: its thread count is process-wide unless set per thread
torch.nn.functional.silu(torch.randn(4_000_000))  # an ATen OpenMP loop
narrow = threads()
set_thread_openmp_threads(2)
x @ x
torch.nn.functional.silu(torch.randn(4_000_000))
print(before, narrow, threads())
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_one_thread_opens_no_pool_and_two_do():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, narrow, wide = map(int, proc.stdout.split())
    assert narrow == before, "a thread set to one OpenMP/MKL thread started worker threads"
    assert wide > narrow, "a thread set to two threads ran its matmul on one"
