"""Assemble an engine from a LoramuxConfig: tokenizer, model, KV cache, adapter store, scheduler."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch
from transformers import AutoTokenizer, GenerationConfig

from loramux.adapter_store.format import load_adapter
from loramux.adapter_store.loader import LoadFn
from loramux.adapter_store.store import AdapterStore
from loramux.kernels.backend import select_backend
from loramux.kernels.cpu_build import default_cache_dir
from loramux.scheduler.config import SchedulerConfig
from loramux.scheduler.scheduler import Scheduler
from loramux.server.config import ConfigError, LoramuxConfig
from loramux.server.engine_core import EngineCore
from loramux.server.models.loader import load_model
from loramux.server.models.protocol import ServingModel
from loramux.server.runner.model_runner import ModelRunner, kv_bytes_per_block

logger = logging.getLogger(__name__)


@dataclass
class EngineParts:
    config: LoramuxConfig
    core: EngineCore
    model: ServingModel
    store: AdapterStore
    tokenizer: object
    eos_token_ids: frozenset[int]
    startup_seconds: float

    def close(self) -> None:
        self.store.close()


def eos_token_ids(model_dir, tokenizer) -> frozenset[int]:
    """All of generation_config's eos_token_id list and the tokenizer's."""
    ids: set[int] = set()
    try:
        generation = GenerationConfig.from_pretrained(str(model_dir))
        eos = generation.eos_token_id
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
    except OSError:
        pass
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def build_engine(config: LoramuxConfig, on_adapter_load=None, adapter_load_fn: LoadFn | None = None) -> EngineParts:
    """on_adapter_load: the store's hook for every finished adapter load (metrics).
    adapter_load_fn: replaces the store's disk read (format.load_adapter); tests slow loads with it."""
    started = time.perf_counter()
    if config.model.dtype == "auto":  # decided once, here; the parts carry the resolved dtype
        config = replace(config, model=config.model.resolved())
    mc = config.model
    device = torch.device(mc.device)
    dtype = mc.torch_dtype
    backend = select_backend(device, dtype, default_cache_dir(), mc.lora_backend)
    # The model first: an unsupported model_type or feature is the first error, not the tokenizer's.
    model = load_model(
        mc.model_dir,
        backend,
        dtype=dtype,
        device=device,
        max_model_len=mc.max_model_len,
        max_lora_slots=config.lora.max_loras,
        max_lora_rank=config.lora.max_lora_rank,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(mc.model_dir))
    block_size = config.cache.block_size
    num_blocks = config.cache.kv_cache_bytes // kv_bytes_per_block(model, block_size)
    needed = -(-model.spec.max_model_len // block_size)
    if num_blocks < needed:
        raise ConfigError(
            f"kv_cache_bytes={config.cache.kv_cache_bytes} holds {num_blocks} blocks; one request of "
            f"max_model_len={model.spec.max_model_len} needs {needed}: raise it or lower max_model_len"
        )
    eos = eos_token_ids(mc.model_dir, tokenizer)
    store = AdapterStore(
        config.adapters,
        model.spec.base_model_spec(),
        model.lora_buffers(),
        dtype,
        device,
        on_load=on_adapter_load,
        load_fn=adapter_load_fn,
    )
    store.start()
    scheduling = config.scheduling
    scheduler = Scheduler(
        SchedulerConfig(
            max_num_batched_tokens=scheduling.max_num_batched_tokens,
            max_num_seqs=scheduling.max_num_seqs,
            num_kv_blocks=num_blocks,
            block_size=block_size,
            max_model_len=model.spec.max_model_len,
            max_loras=config.lora.max_loras,
            long_prefill_token_threshold=scheduling.long_prefill_token_threshold,
            starvation_bound_s=scheduling.starvation_bound_s,
            enable_prefix_caching=config.cache.enable_prefix_caching,
            eos_token_ids=eos,
        ),
        store,
    )
    runner = ModelRunner(model, num_blocks, block_size, seed=mc.seed)
    core = EngineCore(scheduler, runner, tokenizer)
    elapsed = time.perf_counter() - started
    logger.info(
        "engine ready in %.1f s: %s, %d KV blocks of %d tokens, %d adapter slots (rank <= %d), backend %s",
        elapsed, mc.served_model_name, num_blocks, block_size, config.lora.max_loras,
        config.lora.max_lora_rank, backend.name,
    )
    return EngineParts(config, core, model, store, tokenizer, eos, elapsed)
