"""What the store writes into a slot is exactly what format.load_adapter read (in the
serving dtype), laid out as the kernels read it; a reused slot keeps nothing of before."""

from __future__ import annotations

import pytest
import torch

from loramux.adapter_store.format import load_adapter
from tests.adapter_store.store_fixtures import (
    MAX_RANK,
    FakeClock,
    assert_slot_holds,
    make_store,
)

# transformers 5 deprecation noise from inside peft, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.mark.parametrize("stacked", [False, True], ids=["per-module", "stacked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slot_writes_match_load_adapter(tmp_path, make_adapter, spec, dtype, stacked):
    """Adapters made by peft itself, with mixed ranks and partial targets, into per-module
    buffers and into stacked ones (the model's: stacked projections are written at once)."""
    make_adapter(
        "mixed",
        seed=1,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "down_proj"],
        rank_pattern={"k_proj": 2, "layers.1.mlp.down_proj": 8},
    )
    make_adapter("mlp", seed=2, r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear")
    make_adapter("attn", seed=3, r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"])
    clock = FakeClock()
    store = make_store(
        tmp_path, max_slots=1, dtype=dtype, spec=spec, clock=clock, fresh_grace_s=0.0, stacked=stacked
    )
    store.start(run_loader=False)
    # One slot, reused: nothing of before may stay (ranks 8 -> 2 -> 4/2/8 -> 8 -> 2).
    for name in ["mlp", "attn", "mixed", "mlp", "attn"]:
        store.prefetch(name)
        store.drain()
        slot = store.pin(name)
        assert slot == 0
        expected = load_adapter(name, tmp_path / name, spec, MAX_RANK, dtype)
        assert_slot_holds(store, slot, expected)
        assert store.info(name).num_bytes == expected.num_bytes
        assert store.info(name).rank == expected.max_rank
        store.unpin(slot)


def test_dora_and_vocab_adapters_are_sized_as_loaded(tmp_path, make_adapter, spec):
    """What the registry predicts from the config alone is what the loaded adapter takes."""
    from loramux.adapter_store.registry import Describer

    for name, kwargs in {
        "dora": dict(target_modules=["q_proj", "lm_head"], use_dora=True),
        "vocab": dict(target_modules=["embed_tokens", "lm_head", "v_proj"]),
    }.items():
        directory, _ = make_adapter(name, r=4, lora_alpha=8, **kwargs)
        described = Describer(spec, MAX_RANK, torch.float32).describe(name, directory)
        loaded = load_adapter(name, directory, spec, MAX_RANK)
        assert described.num_bytes == loaded.num_bytes
        assert set(described.target_modules) == {module for _, module in loaded.modules}
