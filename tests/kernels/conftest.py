"""Kernel tests: the Triton kernels run on the GPU when there is one, else on CPU tensors
under the Triton interpreter (TRITON_INTERPRET=1, turned on by tests/conftest.py when the
variable is absent, before anything imports triton)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_skip_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if not torch.cuda.is_available() and not _interpreted():
        return "no CUDA device and TRITON_INTERPRET is off: nothing can run the Triton kernels"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _triton_skip_reason()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("triton") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def triton_device() -> torch.device:
    """Where the Triton tests put their tensors: CPU under the interpreter, else the GPU."""
    return torch.device("cpu" if _interpreted() else "cuda")
