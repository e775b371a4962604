"""Hostile adapter configs and weights: refused fast, with a typed error naming the problem.

PEFT patterns that backtrack catastrophically are matched in bounded time without holding
the GIL; finite but absurd numbers and scalings that overflow the serving dtype are refused
at validation; malformed safetensors files never surface as an untyped error.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save, save_file

from loramux.adapter_store.errors import AdapterError, AdapterInvalid
from loramux.adapter_store.format import CONFIG_NAME, WEIGHTS_NAME, load_adapter
from loramux.adapter_store.patterns import MATCH_BUDGET_S, PatternMatcher
from tests.adapter_store.store_fixtures import TINY_SPEC, adapter_files

ID = "hostile"
MAX_RANK = 8
# Backtracks for minutes under `re`; `regex` too runs into its timeout on it.
SLOW = r"(.*){1,32000}[XY]"


@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    """q_proj + v_proj, r=4, alpha 8, every layer; written straight in PEFT's format."""
    config, weights = adapter_files()
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / CONFIG_NAME).write_bytes(config)
    (directory / WEIGHTS_NAME).write_bytes(weights)
    return directory


def set_config(directory: Path, **changes) -> None:
    path = directory / CONFIG_NAME
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def load(directory: Path, dtype: torch.dtype = torch.float32):
    return load_adapter(ID, directory, TINY_SPEC, MAX_RANK, dtype)


# --------------------------------------------------------------------------- patterns


SLOW_CONFIGS = {
    "target_modules": dict(target_modules=SLOW),
    "exclude_modules": dict(exclude_modules=SLOW),
    "rank_pattern": dict(rank_pattern={SLOW: 2}),
    "alpha_pattern": dict(alpha_pattern={SLOW: 2.0}),
    "layers_pattern": dict(layers_to_transform=[0], layers_pattern=[SLOW]),
}


@pytest.mark.parametrize("key", list(SLOW_CONFIGS))
def test_a_catastrophic_pattern_is_refused_within_the_budget(adapter_dir, key):
    set_config(adapter_dir, **SLOW_CONFIGS[key])
    started = time.monotonic()
    with pytest.raises(AdapterInvalid, match="takes too long") as info:
        load(adapter_dir)
    took = time.monotonic() - started
    assert took < 2.0, took
    assert repr(key) in str(info.value)


@pytest.mark.parametrize("pattern", [r"(.*.*)*X", r"(a|aa)*b", r"(\w+\.?)*!", r"(.*\.)*(.*.*)*[XY]"])
def test_textbook_catastrophic_patterns_are_answered_at_once(adapter_dir, pattern):
    """`(.*.*)*X` and kin never match a module name here; `re` would not return."""
    set_config(adapter_dir, target_modules=pattern)
    started = time.monotonic()
    with pytest.raises(AdapterInvalid, match="match no projection"):
        load(adapter_dir)
    assert time.monotonic() - started < 2.0


def test_matching_releases_the_gil():
    """Another thread keeps running while a catastrophic pattern is being matched."""
    gaps: list[float] = []
    done = threading.Event()

    def ticker():
        while not done.is_set():
            started = time.perf_counter()
            time.sleep(0.005)
            gaps.append(time.perf_counter() - started)

    thread = threading.Thread(target=ticker)
    thread.start()
    try:
        matcher = PatternMatcher(ID, None, budget_s=0.5)
        with pytest.raises(AdapterInvalid, match="takes too long"):
            matcher.fullmatch("target_modules", SLOW, "model.layers.27.self_attn.q_proj")
    finally:
        done.set()
        thread.join()
    # Held GIL: one gap of ~0.5 s. Released: ticks every ~5 ms (generous for a busy CI box).
    assert len(gaps) > 10 and max(gaps) < 0.25, (len(gaps), max(gaps))


def test_the_budget_is_shared_by_all_matches_of_a_config():
    clock = iter([0.0, 0.1, MATCH_BUDGET_S + 0.2]).__next__
    matcher = PatternMatcher(ID, None, clock=clock)
    assert matcher.fullmatch("target_modules", r".*q_proj", "model.layers.0.self_attn.q_proj")
    with pytest.raises(AdapterInvalid, match="takes too long"):
        matcher.fullmatch("target_modules", r".*q_proj", "model.layers.0.self_attn.q_proj")


def test_lookarounds_still_work(adapter_dir):
    """PEFT (Python re) accepts lookarounds; real configs use them to skip towers."""
    set_config(adapter_dir, target_modules=r"^(?!.*vision).*\.(q_proj|v_proj)")
    adapter = load(adapter_dir)
    assert {module for _, module in adapter.modules} == {"q_proj", "v_proj"}


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(target_modules="(q_proj"), "bad regex"),
        (dict(target_modules="q_proj|" * 1500 + "v_proj"), "characters long"),
        (dict(rank_pattern={f"m{i}|" + "q" * 2000: 2 for i in range(10)}), "in all"),
        (dict(target_modules=r"x{4294967294}"), "multiplied out"),  # regex.compile: out of memory
        (dict(target_modules=r"((q{100}){100}){100}"), "multiplied out"),  # 0.65 s to compile
        (dict(rank_pattern={r"(?>a{9999999})": 2}), "multiplied out"),
        (dict(rank_pattern={"(": 2}), "bad regex"),
        (dict(target_modules=[f"m{i}" for i in range(5000)]), "at most 4096 names"),
        (dict(rank_pattern={f"m{i}": 2 for i in range(5000)}), "at most 4096 patterns"),
        (dict(layers_to_transform=list(range(5000))), "layers_to_transform"),
    ],
)
def test_pattern_sizes_are_bounded(adapter_dir, changes, words):
    set_config(adapter_dir, **changes)
    with pytest.raises(AdapterInvalid, match=words):
        load(adapter_dir)


def test_wide_character_classes_cost_little_to_check(adapter_dir):
    """re.compile takes ~15 ms per [\u0100-\uffff] with the GIL held; checking must not."""
    set_config(adapter_dir, target_modules="(?i)" + "[\u0100-\uffff]" * 1300)
    started = time.monotonic()
    with pytest.raises(AdapterInvalid, match="match no projection"):
        load(adapter_dir)
    assert time.monotonic() - started < 1.0


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(lora_alpha=1e38), "'lora_alpha' must be a finite number within"),
        (dict(lora_alpha=-1e38), "'lora_alpha'"),
        (dict(alpha_pattern={"q_proj": 1e38}), "'alpha_pattern'"),
        (dict(r=10**400), "'r' must be an integer from 1 to"),
        (dict(rank_pattern={"q_proj": 10**400}), "'rank_pattern'"),
        (dict(layers_to_transform=[10**400]), "'layers_to_transform'"),
    ],
)
def test_finite_but_absurd_values_are_refused(adapter_dir, changes, words):
    set_config(adapter_dir, **changes)
    with pytest.raises(AdapterInvalid, match=words):
        load(adapter_dir)


def test_a_scaling_beyond_the_serving_dtype_is_refused(adapter_dir):
    set_config(adapter_dir, lora_alpha=4e5)  # r=4: scaling 1e5 > fp16's 65504
    load(adapter_dir, torch.float32)
    with pytest.raises(AdapterInvalid, match=r"scaling of .* out of range for torch\.float16"):
        load(adapter_dir, torch.float16)


@pytest.mark.parametrize("rank_pattern", [{}, {r"layers\.1\.self_attn\.q_proj": 2}])
def test_a_scaled_lora_b_that_overflows_is_refused(adapter_dir, rank_pattern):
    """The store folds the scaling into lora_B in the serving dtype: 1e38 * 1e3 is inf."""
    set_config(adapter_dir, lora_alpha=4e3, rank_pattern=rank_pattern)  # scaling 1e3 (r=4)
    path = adapter_dir / WEIGHTS_NAME
    tensors = load_file(path)
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    tensors[key] = torch.full_like(tensors[key], 1e36)
    if rank_pattern:
        key = "base_model.model.model.layers.1.self_attn.q_proj."
        tensors[key + "lora_A.weight"] = tensors[key + "lora_A.weight"][:2].contiguous()
        tensors[key + "lora_B.weight"] = torch.full((64, 2), 1e36)
    save_file(tensors, path)
    with pytest.raises(AdapterInvalid, match="overflow torch.float32"):
        load(adapter_dir)


def test_a_large_but_representable_scaled_lora_b_loads(adapter_dir):
    set_config(adapter_dir, lora_alpha=4e3)  # scaling 1e3
    path = adapter_dir / WEIGHTS_NAME
    tensors = load_file(path)
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    tensors[key] = torch.full_like(tensors[key], 1e30)
    save_file(tensors, path)
    load(adapter_dir)


# --------------------------------------------------------------------------- malformed weights


def _resave_header(weights: bytes, edit) -> bytes:
    n = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8 : 8 + n])
    header, data = edit(header, weights[8 + n :])
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _weights_cases() -> dict[str, tuple]:
    def odd_header(weights: bytes) -> bytes:
        n = int.from_bytes(weights[:8], "little")
        raw = weights[8 : 8 + n].rstrip() + b" "
        while (8 + len(raw)) % 4 == 0:
            raw += b" "
        return struct.pack("<Q", len(raw)) + raw + weights[8 + n :]

    def many_keys(weights: bytes) -> bytes:
        return save({f"t{i}": torch.zeros(1) for i in range(200)})

    def non_ascii_key(weights: bytes) -> bytes:
        def edit(header, data):
            key = next(k for k in header if k != "__metadata__")
            header["model.layers.0.sélf_attn.q_proj.lora_A.weight\u2028"] = header.pop(key)
            return header, data

        return _resave_header(weights, edit)

    return {
        "unaligned": (odd_header, "unaligned tensor data"),
        "too-many-tensors": (many_keys, "tensors"),
        "non-ascii-key": (non_ascii_key, "unexpected tensor"),
        "zeros": (lambda w: bytes(64), "safetensors"),
        "header-length-huge": (lambda w: struct.pack("<Q", 1 << 62) + w[8:], "safetensors"),
    }


@pytest.mark.parametrize("case", list(_weights_cases()))
def test_malformed_weights_get_a_typed_error(adapter_dir, case):
    damage, words = _weights_cases()[case]
    path = adapter_dir / WEIGHTS_NAME
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(AdapterError) as info:
        load(adapter_dir)
    assert isinstance(info.value, AdapterInvalid), info.value
    assert words in str(info.value)


def test_the_unharmed_fixture_loads(adapter_dir):
    assert load(adapter_dir).max_rank == 4
