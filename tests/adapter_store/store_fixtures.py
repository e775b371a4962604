"""Small adapters written straight in PEFT's file format, LoRA buffers, and store builders.

Writing safetensors directly (no peft model) keeps the store tests fast; test_store_slots
checks one peft-made adapter too.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save, save_file

from loramux.adapter_store.config import AdapterStoreConfig
from loramux.adapter_store.format import CONFIG_NAME, WEIGHTS_NAME, BaseModelSpec, load_adapter
from loramux.adapter_store.store import AdapterStore
from loramux.kernels.buffers import LoraModuleBuffers, LoraModuleStack

# 2 layers, GQA: the spec of tests/adapter_store/conftest.py's TINY_LLAMA.
TINY_SPEC = BaseModelSpec(
    num_layers=2,
    module_shapes={
        "q_proj": (64, 64),
        "k_proj": (64, 32),
        "v_proj": (64, 32),
        "o_proj": (64, 64),
        "gate_proj": (64, 128),
        "up_proj": (64, 128),
        "down_proj": (128, 64),
    },
    module_paths={
        **{m: f"self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")},
        **{m: f"mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")},
    },
)
MAX_RANK = 8


def adapter_files(
    spec: BaseModelSpec = TINY_SPEC,
    r: int = 4,
    targets: Iterable[str] = ("q_proj", "v_proj"),
    alpha: float = 8.0,
    seed: int = 0,
) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) bytes of a random LoRA adapter."""
    targets = tuple(targets)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "lora_dropout": 0.0,
        "bias": "none",
    }
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer, module in spec.modules():
        if module not in targets:
            continue
        in_features, out_features = spec.module_shapes[module]
        name = f"base_model.model.{spec.module_name(layer, module)}"
        tensors[f"{name}.lora_A.weight"] = torch.randn(r, in_features, generator=gen)
        tensors[f"{name}.lora_B.weight"] = torch.randn(out_features, r, generator=gen)
    return json.dumps(config).encode(), save(tensors)


def write_adapter(root: Path, name: str, **kwargs) -> Path:
    """Write a random adapter to root/name (see adapter_files for kwargs)."""
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    config, weights = adapter_files(**kwargs)
    (directory / CONFIG_NAME).write_bytes(config)
    (directory / WEIGHTS_NAME).write_bytes(weights)
    return directory


def adapter_bytes(spec: BaseModelSpec = TINY_SPEC, r: int = 4, targets=("q_proj", "v_proj")) -> int:
    """Weights of write_adapter's adapter in float32: what it takes in a tier."""
    per_layer = sum(r * sum(spec.module_shapes[m]) for m in targets)
    return per_layer * spec.num_layers * 4


def make_buffers(
    spec: BaseModelSpec = TINY_SPEC,
    max_slots: int = 3,
    max_rank: int = MAX_RANK,
    dtype: torch.dtype = torch.float32,
    stacked: bool = False,
) -> dict[tuple[int, str], LoraModuleBuffers]:
    """Per-module buffers, or (stacked) one LoraModuleStack per projection as the model has."""
    if stacked:
        stacks = {
            module: LoraModuleStack(spec.num_layers, max_slots, max_rank, *shape, dtype, "cpu")
            for module, shape in spec.module_shapes.items()
        }
        return {
            (layer, module): stacks[module].layers[layer]
            if module in stacks
            else LoraModuleBuffers(max_slots, max_rank, *spec.serving_shape(module), dtype, "cpu")
            for layer, module in spec.modules()
        }
    return {
        (layer, module): LoraModuleBuffers(
            max_slots, max_rank, *spec.serving_shape(module), dtype, "cpu"
        )
        for layer, module in spec.modules()
    }


def make_store(
    adapter_dir: Path | None = None,
    max_slots: int = 3,
    dtype: torch.dtype = torch.float32,
    spec: BaseModelSpec = TINY_SPEC,
    stacked: bool = False,
    **config,
) -> AdapterStore:
    """A store over fresh buffers (not started). Extra kwargs go to AdapterStoreConfig
    or, for load_fn / on_load / clock, to the store."""
    store_kwargs = {k: config.pop(k) for k in ("load_fn", "on_load", "clock") if k in config}
    if adapter_dir is not None:
        config.setdefault("adapter_dirs", (adapter_dir,))
    return AdapterStore(
        AdapterStoreConfig(**config),
        spec,
        make_buffers(spec, max_slots, dtype=dtype, stacked=stacked),
        dtype,
        "cpu",
        **store_kwargs,
    )


class CountingLoader:
    """A load_fn that counts calls per id and can hold loads until released."""

    def __init__(self, hold: bool = False) -> None:
        self.calls: dict[str, int] = {}
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self._lock = threading.Lock()

    def __call__(self, adapter_id, directory, spec, max_rank, dtype=torch.float32):
        with self._lock:
            self.calls[adapter_id] = self.calls.get(adapter_id, 0) + 1
        self.started.set()
        assert self.release.wait(10), "load held for too long"
        return load_adapter(adapter_id, directory, spec, max_rank, dtype)


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def slot_contents(store: AdapterStore, slot: int) -> dict[tuple[int, str], tuple]:
    """Copies of every module's (lora_a, lora_b, rank) in `slot`."""
    return {
        key: (b.lora_a[slot].clone(), b.lora_b[slot].clone(), b.ranks_host[slot])
        for key, b in store._buffers.items()
    }


def write_many(root: Path, count: int, weights_from: Path) -> None:
    """`count` adapters a0..a{count-1} sharing one config and one (hard-linked) weights file."""
    config = (weights_from / CONFIG_NAME).read_bytes()
    weights = weights_from / WEIGHTS_NAME
    for i in range(count):
        directory = root / f"a{i}"
        directory.mkdir()
        (directory / CONFIG_NAME).write_bytes(config)
        try:
            (directory / WEIGHTS_NAME).hardlink_to(weights)
        except OSError:
            save_file({}, directory / WEIGHTS_NAME)  # only sizes are read at registration


def assert_slot_holds(store: AdapterStore, slot: int, adapter) -> None:
    """`slot` holds exactly `adapter` (a format.LoraAdapter) as the kernels read it:
    lora_a rows = PEFT's lora_A, lora_b rows = (scaling * lora_B).T, the rest zero."""
    for key, b in store._buffers.items():
        weights = adapter.modules.get(key)
        if weights is None:
            assert b.ranks_host[slot] == 0 and int(b.ranks[slot]) == 0, key
            continue
        r = weights.lora_a.shape[0]
        assert b.ranks_host[slot] == r and int(b.ranks[slot]) == r, key
        torch.testing.assert_close(b.lora_a[slot, :r], weights.lora_a, rtol=0, atol=0)
        torch.testing.assert_close(
            b.lora_b[slot, :r], (weights.lora_b.t() * weights.scaling).to(b.lora_b.dtype)
        )
        assert not b.lora_a[slot, r:].any() and not b.lora_b[slot, r:].any(), key
