"""The model seam: model_type -> family, one clear error for what is not served."""

from __future__ import annotations

import subprocess
import sys

import pytest
from transformers import GPT2Config, LlamaConfig

from loramux.server.models.registry import adapter_spec_for, family_for, supported_model_types
from loramux.server.models.spec import ModelUnsupported
from tests.tiny_models import TINY, save_tiny_model


def test_registry_names_the_unsupported_model_type():
    with pytest.raises(ModelUnsupported, match=r"model_type 'gpt2' is not supported \(supported: .*llama"):
        family_for(GPT2Config(n_layer=2, n_embd=64, n_head=4))
    assert {"llama", "mistral", "qwen2"} <= set(supported_model_types())


def test_adapter_spec_is_the_family_declaration():
    spec = adapter_spec_for(LlamaConfig(**TINY))
    assert spec.num_layers == 2
    assert spec.module_shapes["k_proj"] == (64, 32) and spec.module_shapes["down_proj"] == (96, 64)
    assert spec.module_name(1, "gate_proj") == "model.layers.1.mlp.gate_proj"
    # embed_tokens and lm_head adapters are declared by the family, as shapes PEFT sees
    assert spec.outer_modules == {"embed_tokens": (128, 64), "lm_head": (64, 128)}
    assert spec.module_name(-1, "embed_tokens") == "model.embed_tokens" and spec.embedding_modules == ("embed_tokens",)
    assert spec.supports_dora


def test_unsupported_rope_feature_is_named(tmp_path):
    from loramux.kernels.backend import select_backend
    from loramux.server.models.loader import load_model

    save_tiny_model(tmp_path, "llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ModelUnsupported, match="rope_type 'dynamic'"):
        load_model(tmp_path, select_backend(__import__("torch").device("cpu"), __import__("torch").float32, name="torch"))


def test_serve_refuses_an_unsupported_model_in_one_line(tmp_path):
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "loramux.server.cli", "serve", "--model", str(tmp_path), "--port", "18931"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "model_type 'gpt2' is not supported" in result.stderr
    assert "Traceback" not in result.stderr
