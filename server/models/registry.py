"""model_type -> the family that serves it; one error naming what is unsupported.

Adding a family is one module with a `DecoderFamily` subclass and one line here.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from loramux.adapter_store.format import BaseModelSpec
from loramux.server.models.family import DecoderFamily
from loramux.server.models.gemma import Gemma2Family, Gemma3TextFamily
from loramux.server.models.llama import LlamaFamily, MistralFamily, Qwen2Family
from loramux.server.models.phi3 import Phi3Family
from loramux.server.models.qwen3 import Qwen3Family
from loramux.server.models.spec import ModelUnsupported

_FAMILIES: tuple[DecoderFamily, ...] = (
    LlamaFamily(),
    MistralFamily(),
    Qwen2Family(),
    Qwen3Family(),
    Gemma2Family(),
    Gemma3TextFamily(),
    Phi3Family(),
)
FAMILIES: dict[str, DecoderFamily] = {t: family for family in _FAMILIES for t in family.model_types}


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(FAMILIES))


def family_for(config: PretrainedConfig) -> DecoderFamily:
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        raise ModelUnsupported(
            f"model_type {model_type!r} is not supported (supported: {', '.join(supported_model_types())})"
        )
    return family


def adapter_spec_for(config: PretrainedConfig) -> BaseModelSpec:
    """What adapters of a model with this config are checked against."""
    return family_for(config).spec(config).adapter_spec
