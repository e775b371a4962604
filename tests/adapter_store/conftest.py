"""Tiny random Llama base models and PEFT LoRA adapters written to tmp_path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from loramux.adapter_store.format import BaseModelSpec
from loramux.server.models.registry import adapter_spec_for

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# 2 layers, GQA (4 query heads, 2 KV heads): q/o are 64 wide, k/v 32, the MLP 128.
TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)


@pytest.fixture(scope="session")
def llama_config():
    return transformers.LlamaConfig(**TINY_LLAMA)


@pytest.fixture(scope="session")
def spec(llama_config) -> BaseModelSpec:
    return adapter_spec_for(llama_config)  # what the model family declares


@pytest.fixture
def make_adapter(tmp_path, llama_config) -> Callable[..., tuple[Path, object]]:
    """make_adapter(name="adapter", seed=0, **LoraConfig kwargs) -> (directory, peft model).

    lora_B is randomized (PEFT initializes it to zero) so that every tensor is distinct.
    """

    def make(name: str = "adapter", seed: int = 0, **lora_kwargs):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(llama_config)
        peft_model = peft.get_peft_model(model, peft.LoraConfig(**lora_kwargs))
        with torch.no_grad():
            for module_name, param in peft_model.named_parameters():
                if ".lora_B." in module_name:
                    torch.nn.init.normal_(param)
        directory = tmp_path / name
        peft_model.save_pretrained(directory)
        return directory, peft_model

    return make
