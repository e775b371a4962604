"""The server's configuration: one frozen dataclass per room, composed here, parsed once.

`loramux serve` builds a LoramuxConfig from its command line; nothing reads the
environment at import time.
"""

from __future__ import annotations

import ipaddress
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
    # Reuse the KV blocks of identical prompt prefixes (same adapter version only);
    # `--no-prefix-caching` turns it off.
    enable_prefix_caching: bool = True

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


LOOPBACK_HOSTS = ("localhost", "::1", "[::1]", "ip6-localhost")


def is_loopback_host(host: str) -> bool:
    """True for names and addresses that only this machine can reach (127.0.0.0/8, ::1)."""
    host = host.strip().lower().rstrip(".")
    if host in LOOPBACK_HOSTS or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    # Adapter management (upload, delete, pin, load/unload). Empty: management is refused,
    # except on a loopback-bound server with no keys at all (local use; see api/auth.py).
    admin_api_keys: tuple[str, ...] = ()
    metrics_require_api_key: bool = False  # /metrics behind the API key (open by default)
    # Client-supplied chat templates (`chat_template`, non-scalar `chat_template_kwargs`)
    # run code-like Jinja on this server: refused unless the operator trusts the clients.
    trust_request_chat_template: bool = False
    max_prompt_tokens: int | None = None  # None: max_model_len - 1
    # A prompt longer than this many characters is refused before it is tokenized
    # (None: 16 characters per token of the prompt limit, more than any tokenizer packs).
    max_prompt_chars: int | None = None
    max_new_tokens: int | None = None  # cap on max_tokens; None: the context decides
    default_max_new_tokens: int = 256  # when a request names none (OpenAI: the context rest)
    max_concurrent_requests: int = 1024  # in-flight sequences (choices); beyond this, 429
    # Bodies of non-upload requests, enforced while they stream in (413 past it).
    max_request_body_bytes: int = 4 << 20
    # prompts x n of one request: the most sequences one request may start.
    max_choices_per_request: int = 16
    max_stop_sequences: int = 16  # stop strings per request (and stop token ids)
    max_stop_sequence_chars: int = 256  # characters per stop string
    # The repetition guard for requests that do not set `repetition_window`: a request
    # whose last N tokens repeat one loop of at most `default_repetition_max_period` tokens
    # ends (finish_reason "length", stop_reason "repetition"). 0 = off.
    default_repetition_window: int = 0
    default_repetition_max_period: int = 8
    # On SIGTERM: /health turns 503, new requests get 503, running ones get this many
    # seconds to finish before they are ended (finish_reason "abort").
    drain_timeout_s: float = 30.0
    log_level: str = "info"

    def __post_init__(self) -> None:
        _check(0 < self.port < 65536, "port must be in 1..65535")
        _check(self.default_max_new_tokens >= 1, "default_max_new_tokens must be >= 1")
        _check(self.max_concurrent_requests >= 1, "max_concurrent_requests must be >= 1")
        _check(self.max_request_body_bytes >= 1024, "max_request_body_bytes must be >= 1024")
        _check(self.max_choices_per_request >= 1, "max_choices_per_request must be >= 1")
        _check(self.max_stop_sequences >= 0, "max_stop_sequences must be >= 0")
        _check(self.max_stop_sequence_chars >= 1, "max_stop_sequence_chars must be >= 1")
        _check(self.drain_timeout_s >= 0, "drain_timeout_s must be >= 0")
        _check(self.default_repetition_window >= 0, "default_repetition_window must be >= 0")
        _check(self.default_repetition_max_period >= 1, "default_repetition_max_period must be >= 1")
        _check(self.max_prompt_chars is None or self.max_prompt_chars >= 1, "max_prompt_chars must be >= 1")

    @property
    def loopback_only(self) -> bool:
        """Bound to a loopback address: only this machine can connect."""
        return is_loopback_host(self.host)

    @property
    def management_open_without_keys(self) -> bool:
        """Keyless adapter management: a loopback-bound server with no keys at all."""
        return self.loopback_only and not self.api_keys and not self.admin_api_keys


@dataclass(frozen=True)
class LoramuxConfig:
    model: ModelConfig
    lora: LoraSlotsConfig = field(default_factory=LoraSlotsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduling: SchedulingConfig = field(default_factory=SchedulingConfig)
    adapters: AdapterStoreConfig = field(default_factory=AdapterStoreConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
