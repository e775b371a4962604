"""Adapters: PEFT format parsing and validation, tiers disk -> CPU -> device, eviction.

Imports point one way: this package never imports `server/`.
"""

from loramux.adapter_store.errors import (
    AdapterError,
    AdapterInvalid,
    AdapterNotFound,
    AdapterTooLarge,
    AdapterUnsupported,
)
from loramux.adapter_store.format import (
    BaseModelSpec,
    LoraAdapter,
    LoraAdapterConfig,
    LoraModuleWeights,
    ModuleTarget,
    load_adapter,
    read_adapter_config,
    resolve_targets,
)
from loramux.adapter_store.store import AdapterInfo, AdapterStatus, AdapterStore, AdapterStoreConfig

__all__ = [
    "AdapterError",
    "AdapterInfo",
    "AdapterInvalid",
    "AdapterNotFound",
    "AdapterStatus",
    "AdapterStore",
    "AdapterStoreConfig",
    "AdapterTooLarge",
    "AdapterUnsupported",
    "BaseModelSpec",
    "LoraAdapter",
    "LoraAdapterConfig",
    "LoraModuleWeights",
    "ModuleTarget",
    "load_adapter",
    "read_adapter_config",
    "resolve_targets",
]
