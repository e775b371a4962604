"""adapter_store.format against peft itself: what it loads, and what it refuses and why."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramux.adapter_store.errors import (
    AdapterError,
    AdapterInvalid,
    AdapterNotFound,
    AdapterTooLarge,
    AdapterUnsupported,
)
from loramux.adapter_store.format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    BaseModelSpec,
    load_adapter,
    read_adapter_config,
    resolve_targets,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

# transformers 5 deprecation noise from inside peft, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

ID = "ad-1"
MAX_RANK = 16
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]

# peft's module name "base_model.model.model.layers.1.mlp.down_proj" -> (1, "down_proj")
_PEFT_NAME = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.\w+\.(\w+)")


def peft_lora_modules(
    peft_model,
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]:
    """(layer, module) -> (lora_A [r, in], lora_B [out, r], scaling) as peft holds them."""
    found = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.scaling:
            match = _PEFT_NAME.fullmatch(name)
            assert match, name
            found[(int(match.group(1)), match.group(2))] = (
                module.lora_A["default"].weight.detach(),
                module.lora_B["default"].weight.detach(),
                module.scaling["default"],
            )
    return found


def _set_config(directory: Path, **changes) -> None:
    """Rewrite adapter_config.json; a value of ... deletes the key."""
    path = directory / CONFIG_NAME
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def _edit_tensors(directory: Path, edit) -> None:
    path = directory / WEIGHTS_NAME
    tensors = edit(load_file(path))
    save_file(tensors, path)


def _assert_loads_like_peft(directory: Path, spec: BaseModelSpec, llama_config) -> None:
    """load_adapter gives what peft gives when it loads the same directory."""
    adapter = load_adapter(ID, directory, spec, max_rank=MAX_RANK)
    # Reload rather than reuse the trained model: peft writes the config with sorted keys,
    # which can change which rank_pattern key matches first (see test_pattern_order_is_file_order).
    reloaded = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM(llama_config), directory
    )
    expected = peft_lora_modules(reloaded)
    assert set(adapter.modules) == set(expected)
    for key, (lora_a, lora_b, scaling) in expected.items():
        weights = adapter.modules[key]
        torch.testing.assert_close(weights.lora_a, lora_a, rtol=0, atol=0)
        torch.testing.assert_close(weights.lora_b, lora_b, rtol=0, atol=0)
        assert weights.scaling == pytest.approx(scaling, rel=1e-12), key
    assert adapter.max_rank == max(a.shape[0] for a, _, _ in expected.values())
    assert adapter.num_bytes == sum((a.numel() + b.numel()) * 4 for a, b, _ in expected.values())
    # The config alone predicts ranks and scalings (what a store sizes slots with).
    targets = resolve_targets(ID, read_adapter_config(ID, directory), spec)
    assert {k: (t.rank, t.scaling) for k, t in targets.items()} == {
        k: (w.lora_a.shape[0], w.scaling) for k, w in adapter.modules.items()
    }
    _assert_stacks(adapter, spec)


def _assert_stacks(adapter, spec: BaseModelSpec) -> None:
    """Projections adapted in every layer with one rank are stacked; the modules are views."""
    layers = range(spec.num_layers)
    uniform = {
        module
        for module in spec.module_shapes
        if all((layer, module) in adapter.modules for layer in layers)
        and len({adapter.modules[(layer, module)].lora_a.shape[0] for layer in layers}) == 1
    }
    assert set(adapter.stacks) == uniform
    for module, stack in adapter.stacks.items():
        assert stack.scalings == tuple(adapter.modules[(layer, module)].scaling for layer in layers)
        for layer in layers:
            weights = adapter.modules[(layer, module)]
            assert weights.lora_a.data_ptr() == stack.lora_a[layer].data_ptr()
            assert weights.lora_b.data_ptr() == stack.lora_b[layer].data_ptr()
            # lora_b is PEFT's [out, r] as a view of the device buffers' [r, out] layout
            assert weights.lora_a.is_contiguous() and weights.lora_b.t().is_contiguous()


# --------------------------------------------------------------------------- what loads


@pytest.mark.parametrize(
    "lora_kwargs",
    [
        pytest.param(dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8), id="list"),
        pytest.param(dict(target_modules=["self_attn.o_proj", "mlp.up_proj"]), id="dotted-list"),
        pytest.param(dict(target_modules=r".*\.(q_proj|down_proj)", r=2), id="regex"),
        pytest.param(dict(target_modules=r"model\.layers\.1\..*_proj"), id="regex-one-layer"),
        pytest.param(dict(target_modules="all-linear", r=3, lora_alpha=7), id="all-linear"),
        pytest.param(
            dict(target_modules="all-linear", exclude_modules=["k_proj", "up_proj"]),
            id="exclude-modules",
        ),
        pytest.param(
            dict(
                target_modules="all-linear",
                r=4,
                lora_alpha=16,
                rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                alpha_pattern={"model.layers.0.self_attn.k_proj": 3.5, "o_proj": 5},
            ),
            id="rank-alpha-pattern",
        ),
        # The first key in order wins: q_proj gets 6 here, 2 in the next case (the keys are
        # chosen so that peft's sorted save keeps the order).
        pytest.param(
            dict(target_modules=ATTN, r=4, rank_pattern={"q_proj": 6, r"self_attn\.\w+": 2}),
            id="pattern-order-specific-first",
        ),
        pytest.param(
            dict(target_modules=ATTN, r=4, rank_pattern={r".*_proj": 2, "q_proj": 6}),
            id="pattern-order-general-first",
        ),
        pytest.param(
            dict(
                target_modules=ATTN,
                r=8,
                lora_alpha=16,
                use_rslora=True,
                rank_pattern={"v_proj": 3},
                alpha_pattern={"o_proj": 2.5},
            ),
            id="rslora",
        ),
        pytest.param(dict(target_modules=["q_proj"], r=4, lora_alpha=12.5), id="float-alpha"),
        pytest.param(dict(target_modules=ATTN, layers_to_transform=[1]), id="layers-list"),
        pytest.param(
            dict(target_modules=["gate_proj"], layers_to_transform=0, layers_pattern="layers"),
            id="layers-int-pattern",
        ),
        pytest.param(
            dict(
                target_modules=["v_proj"],
                layers_to_transform=[0, 1],
                layers_pattern=["h", "layers"],
            ),
            id="layers-pattern-list",
        ),
    ],
)
def test_loads_like_peft(make_adapter, spec, llama_config, lora_kwargs):
    directory, _ = make_adapter(**lora_kwargs)
    _assert_loads_like_peft(directory, spec, llama_config)


def test_pattern_order_is_file_order(make_adapter, spec):
    # peft saves {"q_proj": 6, "\\w+_proj": 2} sorted, so on reload "\\w+_proj" comes first
    # and q_proj expects rank 2: peft's own from_pretrained then fails on the rank-6 tensors.
    directory, _ = make_adapter(
        target_modules=["q_proj"], r=4, rank_pattern={"q_proj": 6, r"\w+_proj": 2}
    )
    with pytest.raises(AdapterInvalid, match=r"shape \[6, 64\], expected \[2, 64\]"):
        load_adapter(ID, directory, spec, max_rank=MAX_RANK)
    # Written in the trained order (as a hand-written config would be), it loads.
    config = json.loads((directory / CONFIG_NAME).read_text())
    config["rank_pattern"] = {"q_proj": 6, r"\w+_proj": 2}
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    assert load_adapter(ID, directory, spec, max_rank=MAX_RANK).max_rank == 6


def test_literal_all_linear(make_adapter, spec, llama_config):
    # peft saves "all-linear" resolved to a list; a hand-written config keeps the shorthand.
    directory, _ = make_adapter(target_modules="all-linear")
    _set_config(directory, target_modules="ALL-LINEAR")
    _assert_loads_like_peft(directory, spec, llama_config)


@pytest.mark.parametrize(
    "rename",
    [
        pytest.param(lambda k: k.replace(".weight", ".default.weight"), id="default-suffix"),
        pytest.param(
            lambda k: k.replace("base_model.model.model.", "base_model.model."), id="short-prefix"
        ),
        pytest.param(lambda k: k.replace("base_model.model.", ""), id="model-prefix"),
    ],
)
def test_key_variants(make_adapter, spec, rename):
    directory, _ = make_adapter(target_modules=["q_proj", "down_proj"])
    expected = load_adapter(ID, directory, spec, max_rank=MAX_RANK)
    _edit_tensors(directory, lambda t: {rename(k): v for k, v in t.items()})
    adapter = load_adapter(ID, directory, spec, max_rank=MAX_RANK)
    assert set(adapter.modules) == set(expected.modules)
    for key, weights in expected.modules.items():
        assert torch.equal(adapter.modules[key].lora_a, weights.lora_a)
        assert torch.equal(adapter.modules[key].lora_b, weights.lora_b)


@pytest.mark.filterwarnings("ignore:Unexpected keyword arguments:UserWarning")  # peft's reload
def test_unknown_config_keys_ignored(make_adapter, spec, llama_config):
    directory, _ = make_adapter(target_modules=["q_proj"])
    _set_config(directory, from_the_future={"x": [1, 2]}, peft_version="99.0", megatron_config=None)
    _assert_loads_like_peft(directory, spec, llama_config)


def test_config_fields(make_adapter):
    directory, _ = make_adapter(
        target_modules=["q_proj", "v_proj"],
        r=4,
        lora_alpha=6.5,
        layers_to_transform=1,
        layers_pattern="layers",
        rank_pattern={"v_proj": 2},
    )
    _set_config(directory, base_model_name_or_path="org/tiny-llama")
    config = read_adapter_config(ID, directory)
    assert (config.r, config.lora_alpha, config.use_rslora) == (4, 6.5, False)
    assert sorted(config.target_modules) == ["q_proj", "v_proj"]
    assert dict(config.rank_pattern) == {"v_proj": 2}
    assert config.layers_to_transform == (1,)
    assert config.layers_pattern == ("layers",)
    assert config.base_model_name_or_path == "org/tiny-llama"


@pytest.mark.parametrize("damage", ["deleted", "garbage"])
def test_read_config_never_opens_weights(make_adapter, damage):
    directory, _ = make_adapter(target_modules=["q_proj"], r=4)
    weights = directory / WEIGHTS_NAME
    if damage == "deleted":
        weights.unlink()
    else:
        weights.write_bytes(b"\xff" * 64)
    assert read_adapter_config(ID, directory).r == 4


def test_dtype_conversion(make_adapter, spec):
    directory, peft_model = make_adapter(target_modules=["q_proj", "o_proj"], r=4)
    adapter = load_adapter(ID, directory, spec, max_rank=MAX_RANK, dtype=torch.bfloat16)
    full = load_adapter(ID, directory, spec, max_rank=MAX_RANK)
    assert all(w.lora_a.dtype == w.lora_b.dtype == torch.bfloat16 for w in adapter.modules.values())
    assert adapter.num_bytes * 2 == full.num_bytes
    lora_a, _, _ = peft_lora_modules(peft_model)[(0, "q_proj")]
    torch.testing.assert_close(adapter.modules[(0, "q_proj")].lora_a, lora_a.bfloat16())


# --------------------------------------------------------------------------- what is refused


@pytest.fixture(scope="module")
def base_adapter(tmp_path_factory, llama_config) -> Path:
    """q_proj + v_proj, r=4, in every layer; copied and damaged by each refusal case."""
    torch.manual_seed(0)
    model = peft.get_peft_model(
        transformers.LlamaForCausalLM(llama_config),
        peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8),
    )
    directory = tmp_path_factory.mktemp("base") / "adapter"
    model.save_pretrained(directory)
    return directory


def _q_a(layer: int = 0, proj: str = "self_attn.q_proj") -> str:
    return f"base_model.model.model.layers.{layer}.{proj}.lora_A.weight"


def _q_b(layer: int = 0) -> str:
    return _q_a(layer).replace("lora_A", "lora_B")


def _tensor_edit(fn):
    return lambda d: _edit_tensors(d, fn)


def _with(**extra):
    def edit(tensors):
        tensors.update(extra)
        return tensors

    return _tensor_edit(edit)


def _without(key):
    return _tensor_edit(lambda t: {k: v for k, v in t.items() if k != key})


def _rename(old, new):
    return _tensor_edit(lambda t: {(new if k == old else k): v for k, v in t.items()})


def _config(**changes):
    return lambda d: _set_config(d, **changes)


def _config_text(text):
    return lambda d: (d / CONFIG_NAME).write_text(text)


def _weights_bytes(fn):
    return lambda d: (d / WEIGHTS_NAME).write_bytes(fn((d / WEIGHTS_NAME).read_bytes()))


def _remove(name):
    return lambda d: (d / name).unlink()


def _bin_only(d):
    (d / WEIGHTS_NAME).unlink()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")


_A = torch.zeros(4, 64)  # a lora_A of the right shape

# Each case: name -> (damage, words in the message, or in .feature for AdapterUnsupported).
CONFIG_INVALID = {
    "bad-json": (_config_text("{not json"), "not valid JSON"),
    "not-utf8": (lambda d: (d / CONFIG_NAME).write_bytes(b"\xff\xfe{"), "JSON"),
    "json-list": (_config_text("[1, 2]"), "must be a JSON object, got list"),
    "no-r": (_config(r=...), "'r' must be an integer from 1 to 65536, got nothing"),
    "r-string": (_config(r="4"), "'r' must be an integer from 1 to 65536, got '4'"),
    "r-bool": (_config(r=True), "'r'"),
    "r-zero": (_config(r=0), "'r'"),
    "alpha-nan": (_config(lora_alpha=float("nan")), "'lora_alpha' must be a finite number"),
    "rslora-string": (_config(use_rslora="yes"), "use_rslora"),
    "targets-int": (_config(target_modules=5), "target_modules"),
    "targets-missing": (_config(target_modules=...), "target_modules"),
    "targets-bad-regex": (_config(target_modules="(q_proj"), "bad regex"),
    "rank-pattern-zero": (_config(rank_pattern={"q_proj": 0}), "rank_pattern"),
    "layers-negative": (_config(layers_to_transform=[-1]), "layers_to_transform"),
    "pattern-no-layers": (_config(layers_pattern="layers"), "layers_to_transform is not"),
    "regex-with-layers": (_config(target_modules=".*q", layers_to_transform=[0]), "regex"),
    "targets-nothing": (_config(target_modules=["fc1"]), "('fc1',) match no projection"),
    "layers-pattern-nothing": (
        _config(layers_to_transform=[0], layers_pattern="h"),
        "in layers_to_transform [0] under layers_pattern ['h'] match no projection",
    ),
}
CONFIG_UNSUPPORTED = {
    "peft-type": (_config(peft_type="IA3"), "non-LoRA PEFT type 'IA3'"),
    "modules-to-save": (_config(modules_to_save=["score"]), "modules_to_save"),
    "bias-all": (_config(bias="all"), "bias != 'none'"),
    "lora-bias": (_config(lora_bias=True), "lora_bias"),
    "target-parameters": (_config(target_parameters=["mlp.down_proj"]), "target_parameters"),
    "trainable-tokens": (_config(trainable_token_indices=[1, 2]), "trainable tokens"),
    "pissa": (_config(init_lora_weights="pissa_niter_4"), "pissa_niter_4"),
    "embed-dora": (_config(target_modules=["q_proj", "embed_tokens"], use_dora=True), "DoRA on an embedding"),
}
WEIGHTS_INVALID = {
    "truncated": (_weights_bytes(lambda b: b[:-20]), "not a valid safetensors file"),
    "header-garbage": (_weights_bytes(lambda b: b[:8] + b"#" * (len(b) - 8)), "safetensors"),
    "empty-file": (_weights_bytes(lambda b: b""), "safetensors"),
    "rank-mismatch": (_with(**{_q_a(): torch.zeros(3, 64)}), "[3, 64], expected [4, 64]"),
    "b-transposed": (_with(**{_q_b(): torch.zeros(4, 64)}), "[out_features, rank]"),
    "missing-b": (_without(_q_b(1)), "no lora_B tensor for model.layers.1.self_attn.q_proj"),
    "untargeted-module": (_with(**{_q_a(0, "self_attn.k_proj"): _A}), "does not target"),
    "unknown-key": (_with(**{"base_model.model.foo.weight": _A}), "'base_model.model.foo.weight'"),
    "unknown-proj": (_with(**{_q_a(0, "mlp.fc1"): _A}), "'mlp.fc1', not a projection"),
    "wrong-block": (_rename(_q_a(), _q_a(0, "mlp.q_proj")), "'mlp.q_proj', not a projection"),
    "layer-out-of-range": (_with(**{_q_a(5): _A}), "layer 5, but the base model has 2 layers"),
    "other-adapter-name": (_rename(_q_a(), _q_a().replace(".weight", ".x.weight")), "x.weight"),
    "duplicate": (_with(**{_q_a().replace(".weight", ".default.weight"): _A}), "both lora_A"),
    "int-dtype": (_with(**{_q_a(): torch.zeros(4, 64, dtype=torch.int32)}), "dtype I32"),
    "nan": (_with(**{_q_a(): torch.full((4, 64), float("nan"))}), "NaN or inf"),
    "inf": (_with(**{_q_b(1): torch.zeros(64, 4).fill_diagonal_(float("inf"))}), "NaN or inf"),
    "dora-no-magnitude": (_config(use_dora=True), "no lora_magnitude_vector tensor for model.layers.0"),
    "magnitude-without-dora": (
        _with(**{_q_a().replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(64)}),
        "DoRA magnitude, but adapter_config.json has no use_dora",
    ),
    "embedding-untargeted": (
        _with(**{"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 128)}),
        "model.embed_tokens, which target_modules does not target",
    ),
    "lm-head-untargeted": (_with(**{"base_model.model.lm_head.lora_A.weight": _A}), "lm_head, which target_modules"),
    "embedding-linear-keys": (
        _with(**{"base_model.model.model.embed_tokens.lora_A.weight": _A}),
        "model.embed_tokens takes lora_embedding_A / lora_embedding_B",
    ),
}
WEIGHTS_UNSUPPORTED = {
    "modules-to-save-tensors": (
        _with(**{"base_model.model.lm_head.modules_to_save.default.weight": torch.zeros(128, 64)}),
        "modules_to_save",
    ),
    "lora-bias-tensors": (
        _with(**{_q_b().replace("weight", "bias"): torch.zeros(64)}),
        "lora_bias",
    ),
}

# name -> (damage, error type, file named in the message, words)
REFUSALS = {
    "no-directory": (shutil.rmtree, AdapterNotFound, "adapter", "no adapter directory"),
    "no-config": (_remove(CONFIG_NAME), AdapterNotFound, CONFIG_NAME, "missing"),
    "no-weights": (_remove(WEIGHTS_NAME), AdapterNotFound, WEIGHTS_NAME, "missing"),
    "pickled-bin": (_bin_only, AdapterUnsupported, "adapter_model.bin", "pickled weights"),
    "rank-too-large": (
        _config(r=32),
        AdapterTooLarge,
        CONFIG_NAME,
        "rank 32 at model.layers.0.self_attn.q_proj exceeds the configured max rank 16",
    ),
    "rank-pattern-too-large": (
        _config(rank_pattern={"v_proj": 17}),
        AdapterTooLarge,
        CONFIG_NAME,
        "rank 17 at model.layers.0.self_attn.v_proj",
    ),
}
for _cases, _error, _file in [
    (CONFIG_INVALID, AdapterInvalid, CONFIG_NAME),
    (CONFIG_UNSUPPORTED, AdapterUnsupported, CONFIG_NAME),
    (WEIGHTS_INVALID, AdapterInvalid, WEIGHTS_NAME),
    (WEIGHTS_UNSUPPORTED, AdapterUnsupported, WEIGHTS_NAME),
]:
    REFUSALS.update({name: (d, _error, _file, words) for name, (d, words) in _cases.items()})


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(base_adapter, tmp_path, spec, case, monkeypatch):
    damage, error_type, file_name, words = REFUSALS[case]
    directory = tmp_path / "adapter"
    shutil.copytree(base_adapter, directory)
    damage(directory)

    # Nothing may ever unpickle adapter files.
    def no_unpickling(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)

    with pytest.raises(error_type) as info:
        load_adapter(ID, directory, spec, max_rank=MAX_RANK)
    error, message = info.value, str(info.value)
    assert error.adapter_id == ID and message.startswith(f"adapter '{ID}' (")
    assert Path(error.path).name == file_name and error.path in message
    assert words in (error.feature if error_type is AdapterUnsupported else message)


# What read_adapter_config alone refuses at registration: no weights, no base model needed.
@pytest.mark.parametrize(
    "case",
    [
        "no-config",
        "bad-json",
        "json-list",
        "no-r",
        "r-zero",
        "targets-bad-regex",
        "regex-with-layers",
        "peft-type",
        "modules-to-save",
        "bias-all",
        "pissa",
    ],
)
def test_config_refusals_need_no_weights(base_adapter, tmp_path, case):
    damage, error_type, _, _ = REFUSALS[case]
    directory = tmp_path / "adapter"
    shutil.copytree(base_adapter, directory)
    (directory / WEIGHTS_NAME).unlink()
    damage(directory)
    with pytest.raises(error_type):
        read_adapter_config(ID, directory)


def test_value_overflowing_serving_dtype(base_adapter, tmp_path, spec):
    directory = tmp_path / "adapter"
    shutil.copytree(base_adapter, directory)
    _with(**{_q_a(): torch.full((4, 64), 1e6)})(directory)  # finite in fp32, inf in fp16
    load_adapter(ID, directory, spec, max_rank=MAX_RANK)
    with pytest.raises(AdapterInvalid, match=r"out of range for torch\.float16"):
        load_adapter(ID, directory, spec, max_rank=MAX_RANK, dtype=torch.float16)


@pytest.mark.parametrize("rank_pattern", [{}, {r"layers\.1\.self_attn\.q_proj": 2}])
def test_loaded_weights_do_not_change_with_the_file(make_adapter, spec, rank_pattern):
    """The adapter owns its memory: a file overwritten in place (same inode, as `cp` does)
    changes nothing loaded, stacked (one rank in every layer) or not (two ranks)."""
    directory, _ = make_adapter("a", seed=1, target_modules=["q_proj"], r=4, rank_pattern=rank_pattern)
    other, _ = make_adapter("b", seed=2, target_modules=["q_proj"], r=4, rank_pattern=rank_pattern)
    adapter = load_adapter(ID, directory, spec, max_rank=MAX_RANK)
    assert bool(adapter.stacks) == (not rank_pattern)
    before = {key: (w.lora_a.clone(), w.lora_b.clone()) for key, w in adapter.modules.items()}
    data = (other / WEIGHTS_NAME).read_bytes()
    assert len(data) == (directory / WEIGHTS_NAME).stat().st_size
    with open(directory / WEIGHTS_NAME, "r+b") as file:  # in place: the same inode
        file.write(data)
    for key, (lora_a, lora_b) in before.items():
        assert torch.equal(adapter.modules[key].lora_a, lora_a), key
        assert torch.equal(adapter.modules[key].lora_b, lora_b), key


def test_finite_values_whose_sum_overflows_are_accepted(base_adapter, tmp_path, spec):
    """The finite check sums each tensor first; an overflowing sum is not a bad value."""
    directory = tmp_path / "adapter"
    shutil.copytree(base_adapter, directory)
    big = torch.full((4, 64), 3e38)  # finite, but the sum is inf in fp32
    _with(**{_q_a(): big})(directory)
    adapter = load_adapter(ID, directory, spec, max_rank=MAX_RANK)
    assert torch.equal(adapter.modules[(0, "q_proj")].lora_a, big)


@pytest.mark.parametrize(
    "error",
    [
        AdapterNotFound("a", None, "not registered"),
        AdapterInvalid("a", "/x/adapter_config.json", "bad"),
        AdapterTooLarge("a", "/x/adapter_config.json", 64, 16, "model.layers.0.self_attn.q_proj"),
        AdapterUnsupported("a", "/x/adapter_config.json", "DoRA", "use_dora=True"),
    ],
)
def test_errors_pickle_and_read_well(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    assert vars(copy) == vars(error)
    assert isinstance(error, AdapterError)
    assert str(error).startswith("adapter 'a'")


def test_spec_takes_the_modules_the_model_declares():
    """The store names no model's modules: any declared module works, if it has a path."""
    spec = BaseModelSpec(num_layers=2, module_shapes={"c_attn": (64, 192)}, module_paths={"c_attn": "attn.c_attn"})
    assert spec.module_name(1, "c_attn") == "model.layers.1.attn.c_attn"
    with pytest.raises(ValueError, match="c_attn"):
        BaseModelSpec(num_layers=2, module_shapes={"c_attn": (64, 192)}, module_paths={})
    with pytest.raises(ValueError, match="qkv"):
        BaseModelSpec(
            num_layers=2,
            module_shapes={"c_attn": (64, 192)},
            module_paths={"c_attn": "attn.c_attn", "qkv": "attn.qkv"},
            packed_modules={"qkv": ("q", "k")},
        )


# --------------------------------------------------------------------------- DoRA, embed_tokens, lm_head


def test_dora_and_vocab_modules_load_like_peft(make_adapter, spec):
    """DoRA magnitudes (fp32) and lora_embedding_A/B / lm_head factors as peft holds them."""
    directory, peft_model = make_adapter(
        r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "embed_tokens", "lm_head"], use_dora=False
    )
    adapter = load_adapter(ID, directory, spec, max_rank=MAX_RANK)
    embed = peft_model.base_model.model.model.embed_tokens
    head = peft_model.base_model.model.lm_head
    assert torch.equal(adapter.modules[(-1, "embed_tokens")].lora_a, embed.lora_embedding_A["default"].detach())
    assert torch.equal(adapter.modules[(-1, "embed_tokens")].lora_b, embed.lora_embedding_B["default"].detach())
    assert torch.equal(adapter.modules[(-1, "lm_head")].lora_b, head.lora_B["default"].weight.detach())
    assert list(adapter.modules)[-2:] == [(-1, "embed_tokens"), (-1, "lm_head")]  # after the layers

    directory, peft_model = make_adapter("dora", r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], use_dora=True)
    adapter = load_adapter(ID, directory, spec, max_rank=MAX_RANK, dtype=torch.bfloat16)
    q = peft_model.base_model.model.model.layers[1].self_attn.q_proj
    weights = adapter.modules[(1, "q_proj")]
    assert weights.lora_a.dtype == torch.bfloat16 and weights.magnitude.dtype == torch.float32
    assert torch.equal(weights.magnitude, q.lora_magnitude_vector["default"].weight.detach())
    assert adapter.stacks["q_proj"].magnitudes.shape == (2, 64)  # every layer: stacked too
    assert adapter.modules[(-1, "lm_head")].magnitude.shape == (128,)
    assert adapter.config.use_dora and adapter.modules[(0, "q_proj")].magnitude is not None


def test_modules_to_save_is_refused_with_a_clear_message(make_adapter, spec, tmp_path):
    """A peft adapter with modules_to_save carries whole trained copies of base modules,
    which one shared base model cannot serve: refused at registration and at load."""
    directory, _ = make_adapter(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    for read in (lambda: read_adapter_config(ID, directory), lambda: load_adapter(ID, directory, spec, MAX_RANK)):
        with pytest.raises(AdapterUnsupported) as info:
            read()
        assert "modules_to_save" in info.value.feature and "whole trained copies" in str(info.value)
        assert "modules_to_save=['lm_head']" in str(info.value)
    # The tensors alone (a config that does not say so) are refused too.
    _set_config(directory, modules_to_save=...)
    with pytest.raises(AdapterUnsupported, match="modules_to_save"):
        load_adapter(ID, directory, spec, MAX_RANK)


def test_resized_vocabulary_is_refused(make_adapter, spec):
    """PEFT saves the base embedding beside an embedding adapter; another vocabulary size
    means a resized model."""
    directory, _ = make_adapter(r=4, lora_alpha=8, target_modules=["embed_tokens"])
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in load_file(directory / WEIGHTS_NAME)
    load_adapter(ID, directory, spec, MAX_RANK)  # the base copy of the right shape is accepted
    _edit_tensors(directory, lambda t: {**t, key: torch.zeros(130, 64)})
    with pytest.raises(AdapterInvalid, match="resize the vocabulary"):
        load_adapter(ID, directory, spec, MAX_RANK)


def test_dora_needs_a_model_that_declares_it(make_adapter, spec):
    directory, _ = make_adapter(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    plain_spec = BaseModelSpec(
        num_layers=spec.num_layers, module_shapes=spec.module_shapes, module_paths=spec.module_paths
    )
    with pytest.raises(AdapterUnsupported, match="declares no DoRA support"):
        load_adapter(ID, directory, plain_spec, MAX_RANK)


def test_warm_parsed_keys_matches_parsing_each_key(make_adapter, spec):
    """The key cache warmed at store start holds what parsing the file's keys would give."""
    from dataclasses import replace

    from safetensors import safe_open

    from loramux.adapter_store.format import _parse_new_tensor_key, warm_parsed_keys

    warm = replace(spec)  # a fresh spec: its own empty cache
    assert not warm.parsed_keys
    warm_parsed_keys(warm)
    assert len(warm.parsed_keys) >= 2 * spec.num_layers * len(spec.module_shapes)
    directory, _ = make_adapter(target_modules="all-linear")
    with safe_open(directory / WEIGHTS_NAME, framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(key in warm.parsed_keys for key in keys)
    for key in keys:
        assert warm.parsed_keys[key] == _parse_new_tensor_key("a", directory, key, warm)
