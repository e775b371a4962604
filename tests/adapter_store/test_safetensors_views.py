"""adapter_store/safetensors_views.py: the same tensors as safetensors' own reader, and a
typed error when the file no longer matches its header."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loramux.adapter_store.safetensors_views import FileChanged, SafetensorsViews


@pytest.fixture
def weights(tmp_path):
    tensors = {
        "a": torch.randn(4, 7),
        "b": torch.randn(3, 5, dtype=torch.float64),
        "c": torch.randn(6, dtype=torch.float16),
        "d": torch.randn(2, 9).to(torch.bfloat16),
    }
    path = tmp_path / "w.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    return path, tensors


def test_views_equal_safetensors(weights):
    path, tensors = weights
    views = SafetensorsViews(path)
    with safe_open(path, framework="pt") as f:
        for key, tensor in tensors.items():
            view = views.get(key)
            assert view.dtype == tensor.dtype and view.shape == tensor.shape
            assert torch.equal(view, f.get_tensor(key)) and torch.equal(view, tensor)


def test_unknown_key_is_file_changed(weights):
    path, _ = weights
    with pytest.raises(FileChanged, match="'zz'"):
        SafetensorsViews(path).get("zz")


def test_truncated_file_is_file_changed(weights):
    path, _ = weights
    data = path.read_bytes()
    path.write_bytes(data[:-8])  # the last tensor's bytes run past the end now
    views = SafetensorsViews(path)
    entries = {k: v for k, v in views._header.items() if k != "__metadata__"}
    last = max(entries, key=lambda k: entries[k]["data_offsets"][1])
    with pytest.raises(FileChanged, match="does not fit"):
        views.get(last)
