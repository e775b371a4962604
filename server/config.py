"""The server's configuration: one frozen dataclass per room, composed here, parsed once.

`loramux serve` builds a LoramuxConfig from its command line; nothing reads the
environment at import time.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from loramux.adapter_store.config import AdapterStoreConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """A setting is out of range or inconsistent with another one."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelConfig:
    model_dir: Path
    # The id clients use for the base model (OpenAI `model`, /info's model_id).
    served_model_name: str
    # auto: bf16 on CUDA; on a CPU, bf16 where it runs bf16 GEMMs faster than fp32 (native
    # bf16 and a start-up probe, server/dtype_choice.py), else fp32. bf16 is not
    # batch-invariant: exact-match tests ask for float32.
    dtype: str = "auto"
    device: str = "cpu"
    max_model_len: int | None = None  # None: the model's own context length
    lora_backend: str = "auto"  # auto | cpu | torch | triton
    # Threads of the engine thread's OpenMP/MKL team (None: torch's default), set by the
    # server's AsyncEngine on its thread; OfflineEngine runs in the caller's thread, which
    # keeps its own setting (torch.set_num_threads).
    num_threads: int | None = None
    seed: int = 0  # of the sampler's default generator (requests without a seed)

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        _check(self.dtype == "auto" or self.dtype in DTYPES, f"dtype must be auto or one of {sorted(DTYPES)}")
        _check(self.lora_backend in ("auto", "cpu", "torch", "triton"), "unknown lora_backend")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype to serve in; 'auto' must have been resolved first (`resolved()`)."""
        if self.dtype == "auto":
            raise ConfigError("dtype 'auto' is resolved at start-up: call ModelConfig.resolved() first")
        return DTYPES[self.dtype]

    def resolved(self) -> ModelConfig:
        """This config with dtype 'auto' replaced by the machine's choice (probed, logged)."""
        if self.dtype != "auto":
            return self
        from loramux.server.dtype_choice import resolve_dtype

        return replace(self, dtype=resolve_dtype(self.dtype, self.device))


@dataclass(frozen=True)
class LoraSlotsConfig:
    """The device tier: stacked slot buffers allocated at start-up."""

    max_loras: int = 8  # adapters on the device at once (= distinct adapters per step)
    max_lora_rank: int = 64  # largest rank an adapter may have

    def __post_init__(self) -> None:
        _check(self.max_loras >= 1, "max_loras must be >= 1")
        _check(self.max_lora_rank >= 1, "max_lora_rank must be >= 1")


@dataclass(frozen=True)
class CacheConfig:
    kv_cache_bytes: int = 2 << 30
    block_size: int = 16

    def __post_init__(self) -> None:
        _check(self.kv_cache_bytes > 0, "kv_cache_bytes must be > 0")
        _check(self.block_size >= 1, "block_size must be >= 1")


@dataclass(frozen=True)
class SchedulingConfig:
    """The scheduler knobs a user sets; the rest of SchedulerConfig comes from the model."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    long_prefill_token_threshold: int = 512  # chunked prefill: decodes are not stalled
    starvation_bound_s: float = 10.0


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    admin_api_keys: tuple[str, ...] = ()  # adapter management; empty: any api key
    max_prompt_tokens: int | None = None  # None: max_model_len - 1
    max_new_tokens: int | None = None  # cap on max_tokens; None: the context decides
    default_max_new_tokens: int = 256  # when a request names none (OpenAI: the context rest)
    max_concurrent_requests: int = 1024  # beyond this, 429 (overloaded)
    log_level: str = "info"

    def __post_init__(self) -> None:
        _check(0 < self.port < 65536, "port must be in 1..65535")
        _check(self.default_max_new_tokens >= 1, "default_max_new_tokens must be >= 1")
        _check(self.max_concurrent_requests >= 1, "max_concurrent_requests must be >= 1")


@dataclass(frozen=True)
class LoramuxConfig:
    model: ModelConfig
    lora: LoraSlotsConfig = field(default_factory=LoraSlotsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduling: SchedulingConfig = field(default_factory=SchedulingConfig)
    adapters: AdapterStoreConfig = field(default_factory=AdapterStoreConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
