"""Merged adapters' weights against peft: `add_weighted_adapter` on a PeftModel holding the
sources (linear, ties) and peft.utils.merge_utils with the same seeds (dare_*)."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel
from peft.utils import merge_utils

from loramux.adapter_store.format import load_adapter
from loramux.adapter_store.merge import MergeSpec, MergeSpecInvalid, check_mergeable, merge_adapters, projection_seed

SOURCES = ("alpha", "beta", "gamma")


@pytest.fixture
def sources(make_adapter, spec):
    """Three rank-4 adapters with different alphas; gamma adapts q/v only."""
    made = {
        "alpha": make_adapter("alpha", seed=1, r=4, lora_alpha=8, target_modules="all-linear"),
        "beta": make_adapter("beta", seed=2, r=4, lora_alpha=4, target_modules="all-linear"),
        "gamma": make_adapter("gamma", seed=3, r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    }
    loaded = {name: load_adapter(name, directory, spec, 16) for name, (directory, _) in made.items()}
    return made, loaded


def peft_merge(made, llama_config, spec: MergeSpec, tmp_path):
    """peft's add_weighted_adapter over the sources: {(layer, module): (A, B)} with scaling 1."""
    import transformers

    base = transformers.LlamaForCausalLM(llama_config)
    first, *rest = spec.ids
    model = PeftModel.from_pretrained(base, made[first][0], adapter_name=first)
    for name in rest:
        model.load_adapter(made[name][0], adapter_name=name)
    model.add_weighted_adapter(list(spec.ids), list(spec.weights), "merged", combination_type=spec.merge_strategy,
                               density=spec.density, majority_sign_method=spec.majority_sign_method)
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "merged" in module.lora_A:
            layer = int(name.split(".layers.")[1].split(".")[0])
            out[(layer, name.rsplit(".", 1)[1])] = (module.lora_A["merged"].weight.detach(),
                                                    module.lora_B["merged"].weight.detach(), module.scaling["merged"])
    return out


@pytest.mark.parametrize("strategy,density,sign", [
    ("linear", 1.0, "total"),
    ("ties", 0.5, "total"),
    ("ties", 0.3, "frequency"),
])
def test_deterministic_strategies_match_peft_add_weighted_adapter(sources, llama_config, tmp_path, strategy, density,
                                                                   sign):
    made, loaded = sources
    spec = MergeSpec.create(SOURCES, [0.7, -0.4, 1.5], strategy, density, sign)
    merged = merge_adapters("merge-x", spec, [loaded[i] for i in SOURCES])
    expected = peft_merge(made, llama_config, spec, tmp_path)
    assert set(merged.modules) == set(expected)
    for key, (a, b, scaling) in expected.items():
        assert scaling == 1.0
        torch.testing.assert_close(merged.modules[key].lora_a, a, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(merged.modules[key].lora_b, b, rtol=1e-6, atol=1e-6)
        assert merged.modules[key].scaling == 1.0


def test_single_adapter_linear_merge_is_the_weighted_delta(sources):
    _, loaded = sources
    merged = merge_adapters("merge-x", MergeSpec.create(["alpha"], [0.5]), [loaded["alpha"]])
    for key, w in loaded["alpha"].modules.items():
        m = merged.modules[key]
        torch.testing.assert_close(m.scaling * m.lora_b @ m.lora_a, 0.5 * w.scaling * w.lora_b @ w.lora_a)


@pytest.mark.parametrize("strategy,sign", [("dare_linear", "total"), ("dare_ties", "total"), ("dare_ties", "frequency")])
def test_dare_matches_peft_merge_utils_with_the_spec_seed(sources, strategy, sign):
    _, loaded = sources
    weights = [1.2, 0.6, -0.9]
    spec = MergeSpec.create(SOURCES, weights, strategy, 0.4, sign)
    merged = merge_adapters("merge-x", spec, [loaded[i] for i in SOURCES])
    again = merge_adapters("merge-x", spec, [loaded[i] for i in SOURCES])
    reference = getattr(merge_utils, strategy)
    for (layer, module), m in merged.modules.items():
        parts = [(loaded[i].modules[(layer, module)], w) for i, w in zip(SOURCES, weights)
                 if (layer, module) in loaded[i].modules]
        scaled = [w * p.scaling for p, w in parts]
        wa = torch.tensor([math.copysign(math.sqrt(abs(s)), s) for s in scaled])
        wb = torch.tensor([math.sqrt(abs(s)) for s in scaled])
        for factor, got, tensors, fw in (("A", m.lora_a, [p.lora_a for p, _ in parts], wa),
                                         ("B", m.lora_b, [p.lora_b for p, _ in parts], wb)):
            torch.manual_seed(projection_seed(spec, layer, module, factor))
            extra = (sign,) if strategy == "dare_ties" else ()
            torch.testing.assert_close(got, reference(tensors, fw, 0.4, *extra), rtol=1e-6, atol=1e-6)
        assert torch.equal(m.lora_a, again.modules[(layer, module)].lora_a)  # reproducible
    # another spec draws other masks
    other = merge_adapters("merge-y", MergeSpec.create(SOURCES, weights, strategy, 0.5, sign),
                           [loaded[i] for i in SOURCES])
    key = next(iter(merged.modules))
    assert not torch.equal((merged.modules[key].lora_a != 0), (other.modules[key].lora_a != 0))


def test_merge_in_serving_dtype_is_computed_in_float32(sources):
    _, loaded = sources
    spec = MergeSpec.create(["alpha", "beta"], [0.3, 0.7], "ties", 0.5)
    full = merge_adapters("m", spec, [loaded["alpha"], loaded["beta"]])
    half = merge_adapters("m", spec, [loaded["alpha"], loaded["beta"]], torch.bfloat16)
    key = next(iter(full.modules))
    assert half.modules[key].lora_a.dtype == torch.bfloat16
    assert torch.equal(half.modules[key].lora_a, full.modules[key].lora_a.to(torch.bfloat16))
    assert half.num_bytes * 2 == full.num_bytes


def test_different_ranks_are_refused_naming_ids(make_adapter, spec):
    a, _ = make_adapter("a", r=4, target_modules=["q_proj"])
    b, _ = make_adapter("b", r=8, target_modules=["q_proj"])
    adapters = [load_adapter("a", a, spec, 16), load_adapter("b", b, spec, 16)]
    with pytest.raises(MergeSpecInvalid) as info:
        merge_adapters("m", MergeSpec.create(["a", "b"]), adapters)
    assert info.value.field == "ids" and "ranks 4 and 8" in info.value.message


@pytest.mark.parametrize("kwargs,field", [
    (dict(ids=[]), "ids"),
    (dict(ids=["a"] * 9), "ids"),
    (dict(ids=["a", "a"]), "ids"),
    (dict(ids=["a", "b"], weights=[1.0]), "weights"),
    (dict(ids=["a"], weights=[float("nan")]), "weights"),
    (dict(ids=["a"], weights=[0.0]), "weights"),
    (dict(ids=["a"], merge_strategy="svd"), "merge_strategy"),
    (dict(ids=["a"], merge_strategy="ties", density=0.0), "density"),
    (dict(ids=["a"], merge_strategy="ties", density=1.5), "density"),
    (dict(ids=["a"], merge_strategy="ties", majority_sign_method="mean"), "majority_sign_method"),
])
def test_bad_specs_name_the_field(kwargs, field):
    with pytest.raises(MergeSpecInvalid) as info:
        MergeSpec.create(**kwargs)
    assert info.value.field == field


def test_canonical_spec_ignores_unused_fields_and_hashes_versions():
    a = MergeSpec.create(["x", "y"], None, "linear", 0.3, "frequency")
    b = MergeSpec.create(["x", "y"], [1, 1])
    assert a == b and a.digest([1, 1]) == b.digest([1, 1])
    assert a.digest([1, 1]) != a.digest([1, 2])
    assert MergeSpec.create(["y", "x"]).digest() != a.digest()


def test_dora_and_embedding_adapters_are_not_merged():
    with pytest.raises(MergeSpecInvalid, match="DoRA") as info:
        check_mergeable("d", [(0, "q_proj")], dora=True)
    assert info.value.field == "ids"
    with pytest.raises(MergeSpecInvalid, match="embed_tokens"):
        check_mergeable("e", [(-1, "embed_tokens"), (0, "q_proj")], dora=False)
    check_mergeable("plain", [(0, "q_proj"), (1, "v_proj")], dora=False)
