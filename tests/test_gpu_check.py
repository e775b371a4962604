"""`make gpu-check` (bench/gpu_check.py): where there is no CUDA it says so and exits 0;
its runner comparison and W16 parts run end to end on the CPU backends (slow suite)."""

from __future__ import annotations

import pytest
import torch

from bench import gpu_check


def test_without_cuda_it_skips_with_a_message(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    assert "gpu-check: skipped: no CUDA device" in capsys.readouterr().out


@pytest.mark.slow
def test_cpu_smoke_run_passes_and_prints_one_summary_line(capsys):
    assert gpu_check.main(["--device", "cpu", "--small"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("gpu-check: triton_tests=skipped(cpu) runner_fp32=pass runner_bf16=pass w16_base=")
    figures = dict(part.split("=", 1) for part in last.split()[1:])
    assert float(figures["w16_base"]) > 0 and float(figures["w16_mixed8"]) > 0
