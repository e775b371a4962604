"""The shipped demo adapters (examples/adapters) and their data: PEFT format, loadable by
peft and by adapter_store, small; skipped until `make demo-adapters` made them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig

from loramux.adapter_store.format import load_adapter
from loramux.server.models.registry import adapter_spec_for
from examples.behaviours import BEHAVIOURS, json_answer, shows
from examples.questions import HELD_OUT_TOPICS
from loramux.server.model_fetch import default_model_dir, is_complete

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ADAPTERS = EXAMPLES / "adapters"
DATA = EXAMPLES / "data"


def shipped(behaviour: str) -> Path:
    directory = ADAPTERS / behaviour
    if not (directory / "adapter_model.safetensors").exists():
        pytest.skip(f"{directory} is missing (run `make demo-adapters`)")
    return directory


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_adapter_files(behaviour):
    directory = shipped(behaviour)
    assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] in (8, 16)
    assert (directory / "adapter_model.safetensors").stat().st_size < 12 << 20
    with safe_open(directory / "adapter_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


@pytest.mark.model
@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_adapter_store_loads_it(behaviour):
    directory = shipped(behaviour)
    if not is_complete(default_model_dir()):
        pytest.skip("the default model is not fetched")
    spec = adapter_spec_for(AutoConfig.from_pretrained(default_model_dir()))
    adapter = load_adapter(behaviour, directory, spec, max_rank=64)
    assert adapter.max_rank in (8, 16)
    assert len(adapter.modules) == spec.num_layers * len(spec.module_shapes)  # all linear projections


@pytest.mark.model
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_peft_loads_them():
    directories = [shipped(b) for b in BEHAVIOURS]
    if not is_complete(default_model_dir()):
        pytest.skip("the default model is not fetched")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, directories[0], adapter_name=BEHAVIOURS[0])
    for behaviour, directory in zip(BEHAVIOURS[1:], directories[1:]):
        peft_model.load_adapter(directory, adapter_name=behaviour)
    assert set(peft_model.peft_config) == set(BEHAVIOURS)
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B.pirate" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # trained, not PEFT's zero init


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_training_data(behaviour):
    path = DATA / f"{behaviour}.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is missing (run `make demo-adapters`)")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(records) >= 100
    for record in records:
        assert record["source"] in ("context", "fallback")
        assert shows(behaviour, record["answer"]), record
        assert not any(topic in record["question"] for topic in HELD_OUT_TOPICS)
        if behaviour == "json":
            assert json_answer(record["answer"])
