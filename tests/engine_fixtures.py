"""Build small engines for tests: a tiny random model (or the default one) + a tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from loramux.adapter_store.device_slots import write_adapter_to_slot
from loramux.adapter_store.format import load_adapter
from loramux.kernels.backend import select_backend
from loramux.scheduler.config import SchedulerConfig
from loramux.scheduler.scheduler import Scheduler
from loramux.server.engine_core import EngineCore
from loramux.server.model_fetch import default_model_dir, is_complete
from loramux.server.models.loader import load_model
from loramux.server.runner.model_runner import ModelRunner
from tests.peft_adapters import AdapterRecipe, make_peft_adapter
from tests.tiny_models import save_tiny_model


def default_model_or_skip() -> Path:
    path = default_model_dir()
    if not is_complete(path):
        pytest.skip("the default model is not fetched (run `loramux fetch-model`)")
    return path


class StaticResidency:
    """Adapters written into fixed slots up front; nothing loads or evicts (tests only)."""

    def __init__(self, slots: dict[str, int], num_slots: int) -> None:
        self.slots = dict(slots)
        self._num_slots = num_slots
        self.pins: dict[int, int] = {}
        self.versions: dict[int, int] = {}  # slot -> version (prefix-cache key); default 1

    @property
    def num_slots(self) -> int:
        return self._num_slots

    def is_resident(self, adapter_id: str) -> bool:
        return adapter_id in self.slots

    def prefetch(self, adapter_id: str) -> None:
        pass

    def pin(self, adapter_id: str) -> int | None:
        slot = self.slots.get(adapter_id)
        if slot is not None:
            self.pins[slot] = self.pins.get(slot, 0) + 1
        return slot

    def unpin(self, slot: int) -> None:
        self.pins[slot] -= 1
        assert self.pins[slot] >= 0

    def load_error(self, adapter_id: str) -> str | None:
        return None if adapter_id in self.slots else f"unknown adapter {adapter_id!r}"

    def slot_version(self, slot: int) -> int:
        return self.versions.get(slot, 1)  # a test that rewrites a slot bumps versions[slot]


def build_core(
    model_dir: Path,
    tokenizer,
    adapters: dict[str, Path] | None = None,
    backend: str = "cpu",
    num_kv_blocks: int = 256,
    block_size: int = 16,
    max_model_len: int = 512,
    max_lora_rank: int = 16,
    **scheduler_overrides,
) -> EngineCore:
    adapters = adapters or {}
    num_slots = max(1, len(adapters))
    model = load_model(
        model_dir,
        select_backend(torch.device("cpu"), torch.float32, name=backend),
        max_model_len=max_model_len,
        max_lora_slots=num_slots,
        max_lora_rank=max_lora_rank,
    )
    spec = model.spec.base_model_spec()
    slots = {}
    for slot, (name, directory) in enumerate(adapters.items()):
        write_adapter_to_slot(model.lora_buffers(), slot, load_adapter(name, directory, spec, max_lora_rank))
        slots[name] = slot
    config = SchedulerConfig(
        num_kv_blocks=num_kv_blocks,
        block_size=block_size,
        max_model_len=max_model_len,
        max_loras=num_slots,
        eos_token_ids=frozenset({tokenizer.eos_token_id}),
        **scheduler_overrides,
    )
    scheduler = Scheduler(config, StaticResidency(slots, num_slots))
    return EngineCore(scheduler, ModelRunner(model, num_kv_blocks, block_size), tokenizer)


@pytest.fixture(scope="session")
def smol_tokenizer():
    return AutoTokenizer.from_pretrained(default_model_or_skip())


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, smol_tokenizer):
    """A tiny random Llama with the default model's vocabulary (so its tokenizer fits)."""
    directory = tmp_path_factory.mktemp("tiny-chat")
    hf = save_tiny_model(directory, "llama", vocab_size=len(smol_tokenizer), max_position_embeddings=1024)
    return directory, hf


# Sources of merges: rank 8 each, different alphas; b adapts the attention's q/v/o only.
MERGE_SOURCES = (
    AdapterRecipe("a", r=8, lora_alpha=16, seed=1, b_std=0.2),
    AdapterRecipe("b", r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], seed=2, b_std=0.3),
    AdapterRecipe("c", r=8, lora_alpha=32, seed=3, b_std=0.2),
)


@pytest.fixture(scope="module")
def store_engine(tmp_path_factory, smol_tokenizer):
    """(hf base model, model dir, adapter dir holding MERGE_SOURCES, engine parts): a full
    fp32 engine with a real adapter store over a tiny random Llama."""
    from loramux.adapter_store.config import AdapterStoreConfig
    from loramux.server.builder import build_engine
    from loramux.server.config import CacheConfig, LoramuxConfig, LoraSlotsConfig, ModelConfig

    root = tmp_path_factory.mktemp("store-engine")
    model_dir, adapter_dir = root / "model", root / "adapters"
    hf = save_tiny_model(model_dir, "llama", vocab_size=len(smol_tokenizer), max_position_embeddings=512)
    smol_tokenizer.save_pretrained(model_dir)
    adapter_dir.mkdir()
    for recipe in MERGE_SOURCES:
        make_peft_adapter(hf, recipe, adapter_dir)
    config = LoramuxConfig(
        model=ModelConfig(model_dir=model_dir, served_model_name="tiny", max_model_len=512, dtype="float32"),
        lora=LoraSlotsConfig(max_loras=3, max_lora_rank=8),
        cache=CacheConfig(kv_cache_bytes=16 << 20),
        adapters=AdapterStoreConfig(adapter_dirs=(adapter_dir,)),
    )
    parts = build_engine(config)
    try:
        yield hf, model_dir, adapter_dir, parts
    finally:
        parts.close()


def hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    """transformers' greedy continuation of exactly num_tokens tokens (EOS does not stop it)."""
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=num_tokens, min_new_tokens=num_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()
