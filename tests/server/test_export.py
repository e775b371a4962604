"""`loramux export`: the exported checkpoint, run alone by transformers in fp32, gives the
greedy tokens of serving the adapter (or the merge); the fold is computed in fp32 and
rounded once to the base's dtype."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from loramux.adapter_store.format import load_adapter
from loramux.adapter_store.merge import MergeSpec
from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.cli import main
from loramux.server.offline import OfflineEngine, OfflineRequest
from tests.engine_fixtures import hf_greedy

NEW_TOKENS = 10
PROMPTS = ("The quick brown fox", "Once upon a time in a land")
MERGE = {"ids": ["a", "b"], "weights": [0.7, 0.6], "merge_strategy": "dare_linear", "density": 0.7}


def served_tokens(parts, adapter_id: str, prompts) -> list[list[int]]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    results = OfflineEngine(parts.core).generate([OfflineRequest(p, params, adapter_id) for p in prompts])
    return [r.token_ids for r in results]


@pytest.mark.parametrize("target", ["a", json.dumps(MERGE)], ids=["adapter", "merge"])
def test_exported_model_alone_matches_serving(store_engine, smol_tokenizer, tmp_path, target):
    _, model_dir, adapter_dir, parts = store_engine
    out = tmp_path / "exported"
    assert main(["export", target, "--out", str(out), "--model", str(model_dir), "--adapter-dir", str(adapter_dir),
                 "--upload-dir", str(tmp_path / "none")]) == 0
    prompts = [smol_tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    served_id = "a" if target == "a" else parts.store.merges.resolve(MergeSpec.create(**MERGE))
    expected = served_tokens(parts, served_id, prompts)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert [hf_greedy(exported, p, NEW_TOKENS) for p in prompts] == expected
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert hf_greedy(base, prompts[0], NEW_TOKENS) != expected[0]  # the adapter is in the weights
    assert (out / "tokenizer.json").exists()


def test_fold_is_computed_in_fp32_and_saved_in_the_base_dtype(store_engine, smol_tokenizer, tmp_path):
    _, model_dir, adapter_dir, parts = store_engine
    bf16_base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).save_pretrained(bf16_base)
    smol_tokenizer.save_pretrained(bf16_base)
    out, wide = tmp_path / "bf16", tmp_path / "fp32"
    for directory, extra in ((out, []), (wide, ["--dtype", "float32"])):
        assert main(["export", str(adapter_dir / "a"), "--out", str(directory), "--model", str(bf16_base), *extra]) == 0
    weights, wide_weights = load_file(out / "model.safetensors"), load_file(wide / "model.safetensors")
    base = load_file(bf16_base / "model.safetensors")
    name = "model.layers.1.self_attn.q_proj.weight"
    assert weights[name].dtype == torch.bfloat16 and wide_weights[name].dtype == torch.float32
    w = load_adapter("a", adapter_dir / "a", parts.store.spec, 8).modules[(1, "q_proj")]
    exact = base[name].float() + w.scaling * (w.lora_b @ w.lora_a)
    torch.testing.assert_close(wide_weights[name], exact, rtol=0, atol=1e-6)
    assert torch.equal(weights[name], exact.to(torch.bfloat16))  # rounded once, from fp32


def test_bad_targets_exit_with_a_message(store_engine, tmp_path):
    model_dir, adapter_dir = store_engine[1], store_engine[2]
    common = ["--model", str(model_dir), "--adapter-dir", str(adapter_dir), "--upload-dir", str(tmp_path / "none")]
    for target, message in (("nope", "is not in"), ('{"ids": ["a"], "density": 2}', "density"),
                            ('{"ids": ["a"], "extra": 1}', "unknown merge spec fields")):
        with pytest.raises(SystemExit, match=message):
            main(["export", target, "--out", str(tmp_path / "x"), *common])
