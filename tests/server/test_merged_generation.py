"""Merged adapters served by a full engine (real store, fp32, greedy) give transformers +
peft's tokens with the merged weights loaded, also in one batch with a source adapter, the
base model and another merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import PeftModel
from safetensors.torch import save_file

from loramux.adapter_store.format import LoraAdapter, load_adapter
from loramux.adapter_store.merge import MergeSpec, merge_adapters
from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.offline import OfflineEngine, OfflineRequest
from tests.engine_fixtures import hf_greedy

NEW_TOKENS = 12
TIES = MergeSpec.create(["a", "b", "c"], [0.8, 0.5, 0.6], "ties", 0.6)
DARE = MergeSpec.create(["a", "c"], [1.0, 0.7], "dare_ties", 0.5, "frequency")
PROMPTS = ("The quick brown fox", "Once upon a time in a land", "Hello there, how are", "One two three four")


def save_as_peft(adapter: LoraAdapter, spec, directory: Path) -> Path:
    """A merged adapter (scalings 1) in PEFT's files, for peft to load."""
    directory.mkdir(parents=True, exist_ok=True)
    rank = adapter.max_rank
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
              "target_modules": list(adapter.config.target_modules), "lora_dropout": 0.0, "bias": "none"}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    tensors = {}
    for (layer, module), w in adapter.modules.items():
        name = f"base_model.model.{spec.module_name(layer, module)}"
        tensors[f"{name}.lora_A.weight"] = w.lora_a.contiguous()
        tensors[f"{name}.lora_B.weight"] = w.lora_b.contiguous()
    save_file(tensors, directory / "adapter_model.safetensors")
    return directory


@pytest.fixture(scope="module")
def references(store_engine, smol_tokenizer, tmp_path_factory):
    """prompt index -> expected tokens, from transformers + peft: ties through peft's own
    add_weighted_adapter, dare_ties with the merged weights loaded (DARE's draw is ours)."""
    hf, _, adapter_dir, parts = store_engine
    peft_model = PeftModel.from_pretrained(hf, adapter_dir / "a", adapter_name="a")
    for name in ("b", "c"):
        peft_model.load_adapter(adapter_dir / name, adapter_name=name)
    peft_model.add_weighted_adapter(list(TIES.ids), list(TIES.weights), "ties", combination_type="ties",
                                    density=TIES.density, majority_sign_method=TIES.majority_sign_method)
    spec = parts.store.spec
    sources = [load_adapter(i, adapter_dir / i, spec, 8) for i in DARE.ids]
    dare_dir = save_as_peft(merge_adapters("dare", DARE, sources), spec, tmp_path_factory.mktemp("dare") / "dare")
    peft_model.load_adapter(dare_dir, adapter_name="dare")
    peft_model.eval()
    prompts = [smol_tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    expected = {}
    for i, adapter in enumerate(("ties", "a", None, "dare")):
        if adapter is None:
            with peft_model.disable_adapter():
                expected[i] = hf_greedy(peft_model, prompts[i], NEW_TOKENS)
        else:
            peft_model.set_adapter(adapter)
            expected[i] = hf_greedy(peft_model, prompts[i], NEW_TOKENS)
    peft_model.unload()
    return prompts, expected


def test_merges_in_a_mixed_batch_match_transformers_peft(store_engine, references):
    parts = store_engine[3]
    prompts, expected = references
    ties_id = parts.store.merges.resolve(TIES)
    dare_id = parts.store.merges.resolve(DARE)
    adapters = (ties_id, "a", None, dare_id)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    engine = OfflineEngine(parts.core)
    results = engine.generate([OfflineRequest(p, params, a) for p, a in zip(prompts, adapters)])
    for i, result in enumerate(results):
        assert result.token_ids == expected[i], (adapters[i], i)
    # the merge is visible: the same prompt under source `a` alone says something else
    alone = engine.generate([OfflineRequest(prompts[0], params, "a")])[0]
    assert alone.token_ids != expected[0]
    assert parts.store.merges.num_builds == 2
    # served again: a hit, nothing is built again
    again = engine.generate([OfflineRequest(prompts[0], params, parts.store.merges.resolve(TIES))])[0]
    assert again.token_ids == expected[0] and parts.store.merges.num_builds == 2
