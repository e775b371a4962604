"""PEFT LoRA adapters on disk: parse `adapter_config.json`, load `adapter_model.safetensors`,
and check both against the base model.

An adapter directory holds
    adapter_config.json          PEFT's LoraConfig as JSON (read alone when registering adapters)
    adapter_model.safetensors    one lora_A / lora_B pair per adapted projection

Tensors keep PEFT's layout:
    lora_A.weight  [rank, in_features]    (lora_embedding_A of an embedding: [rank, vocab])
    lora_B.weight  [out_features, rank]   (lora_embedding_B of an embedding: [hidden, rank])
    lora_magnitude_vector  [out_features] (DoRA only)
Semantics: y += scaling * (x @ lora_A.T) @ lora_B.T
           scaling = alpha / r, or alpha / sqrt(r) with rsLoRA
           (an embedding's x is the one-hot row of each token id)
DoRA (use_dora): y = m / ||W + scaling * lora_B @ lora_A||_row * (x @ W.T + LoRA delta) + bias,
           with W the base weight [out, in]; the norm is per output row (see loramux_kernels/dora.py).

Module names are PEFT's names inside the base model, e.g. `model.layers.3.self_attn.q_proj`:
PEFT matches target_modules, rank_pattern and alpha_pattern before it wraps the model in
`base_model.model.`, so that prefix is never part of the matched name.

The rules mirror peft 0.21 (`check_target_module_exists`, `get_pattern_key`,
`_maybe_include_all_linear_layers`, `LoraLayer.update_layer`); the tests compare with peft
itself. Weights are read with safetensors only: a pickled `adapter_model.bin` is refused,
never unpickled. This module imports nothing from `server/`.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from loramux.adapter_store.cpu_arena import BlockCarver, HostAlloc, fresh_alloc
from loramux.adapter_store.errors import (
    AdapterError,
    AdapterInvalid,
    AdapterNotFound,
    AdapterTooLarge,
    AdapterUnsupported,
)
from loramux.adapter_store.patterns import (
    MAX_CONFIG_PATTERN_CHARS,
    PatternMatcher,
    check_pattern,
)
from loramux.adapter_store.safetensors_views import FileChanged, MisalignedTensor, SafetensorsViews
from loramux.adapter_store.value_limits import (
    MAX_ABS_LORA_ALPHA,
    MAX_CONFIG_ENTRIES,
    MAX_LAYER_INDEX,
    MAX_RANK_VALUE,
    check_scaled_lora_b,
    check_scalings,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"  # refused: loading it would run pickle
ALL_LINEAR = "all-linear"  # PEFT's shorthand, compared case-insensitively as PEFT does

# A config is a few KiB; the cap keeps a stray huge file from being read into memory.
_MAX_CONFIG_BYTES = 8 << 20

# safetensors dtype names we accept for lora_A / lora_B (fp8 and integers are refused).
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

# init_lora_weights values whose adapters only work on base weights PEFT modifies in place
# (peft redoes it on load). PiSSA/OLoRA/CorDA/LoRA-GA adapters re-saved with
# path_initial_model_for_weight_conversion say `true` instead and load fine.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")

MODULES_TO_SAVE = "modules_to_save (whole trained copies of base modules)"
# Config keys that, when set (truthy), select a PEFT feature loramux does not serve.
_UNSUPPORTED_KEYS: tuple[tuple[str, str], ...] = (
    ("modules_to_save", MODULES_TO_SAVE),
    ("lora_bias", "LoRA bias (lora_bias)"),
    ("target_parameters", "target_parameters"),
    ("trainable_token_indices", "trainable tokens (trainable_token_indices)"),
    ("layer_replication", "layer_replication"),
    ("use_qalora", "QA-LoRA (use_qalora)"),
    ("alora_invocation_tokens", "aLoRA (alora_invocation_tokens)"),
    ("velora_config", "VeLoRA (velora_config)"),
    ("monteclora_config", "MonteCLoRA (monteclora_config)"),
    ("use_bdlora", "BD-LoRA (use_bdlora)"),
    ("arrow_config", "Arrow routing (arrow_config)"),
    ("kasa_config", "KaSA (kasa_config)"),
)

# `<prefix>layers.<i>.<block>.<proj>.<tensor>`, where <prefix> is PEFT's
# `base_model.model.model.` or a shorter variant other tools write, and <tensor> is
# lora_<A|B>[.default].weight or DoRA's lora_magnitude_vector[.default][.weight].
_LORA_KEY = re.compile(
    r"(?:base_model\.model\.)?(?:model\.)?layers\.(?P<layer>0|[1-9][0-9]*)\."
    r"(?P<path>.+?)\.(?:lora_(?P<factor>[AB])(?:\.default)?\.weight"
    r"|(?P<magnitude>lora_magnitude_vector)(?:\.default)?(?:\.weight)?)"
)
# The tensor part of a key of a module outside the layers (embed_tokens, lm_head) -> factor:
# A / B (lora_embedding_A/B for an embedding), M (DoRA magnitude), W (a saved base copy).
_OUTER_TENSOR = re.compile(
    r"lora_(?P<factor>[AB])(?:\.default)?\.weight|lora_embedding_(?P<embedding>[AB])(?:\.default)?"
    r"|(?P<magnitude>lora_magnitude_vector)(?:\.default)?(?:\.weight)?|(?P<base>base_layer\.weight)"
    r"|(?P<whole>weight)"  # the module itself, replaced: how PEFT saves modules_to_save
)
MODEL_LEVEL = -1  # the "layer index" of modules outside the decoder layers (embed_tokens, lm_head)
# Keys of PEFT features that are not plain LoRA on a projection: (pattern, feature).
_UNSUPPORTED_KEY_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\.lora_[AB](?:\.default)?\.bias$"), "LoRA bias (lora_bias)"),
    (re.compile(r"trainable_tokens"), "trainable tokens (trainable_token_indices)"),
    (re.compile(r"\.modules_to_save\."), MODULES_TO_SAVE),
)


def _short_repr() -> reprlib.Repr:
    """repr() of config values in messages, cut to a line (Repr takes no kwargs before 3.12)."""
    short = reprlib.Repr()
    short.maxstring = short.maxother = 80
    short.maxlist = short.maxdict = 8
    return short


_short = _short_repr().repr


@dataclass(frozen=True)
class BaseModelSpec:
    """What an adapter is checked against: the adaptable modules the base model declares.

    The model family (server/models/) builds it; nothing here names a model's modules.
    Serving modules are what a device slot holds per layer; a packed module is one PEFT
    sees in the checkpoint (Phi-3's `qkv_proj`) whose output concatenates serving
    modules (q_proj, k_proj, v_proj). An adapter on a packed module is served as one
    adapter per part that shares lora_A and takes its rows of lora_B (exact: the parts'
    outputs are the packed output's column slices).
    """

    num_layers: int
    # serving module (PEFT leaf name) -> (in_features, out_features)
    module_shapes: Mapping[str, tuple[int, int]]
    # PEFT leaf name -> its path inside a decoder layer, e.g. "self_attn.q_proj"; every
    # serving module and every packed module has one
    module_paths: Mapping[str, str]
    # packed PEFT module -> the serving modules its output concatenates, in order
    packed_modules: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # PEFT leaf names "all-linear" resolves to (the model's nn.Linear leaves but the
    # output head); None: the serving modules
    all_linear: tuple[str, ...] | None = None
    layers_prefix: str = "model.layers"  # full name of the decoder layer list
    # full module names outside the layers that adapters may not target -> feature name
    refused_modules: Mapping[str, str] = field(default_factory=dict)
    # modules outside the layers that adapters may target, served at layer MODEL_LEVEL:
    # PEFT leaf name -> (in_features, out_features) as PEFT sees it (an embedding's in is
    # the vocabulary: lora_embedding_A [r, vocab], lora_embedding_B [hidden, r])
    outer_modules: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    outer_paths: Mapping[str, str] = field(default_factory=dict)  # leaf -> full name
    embedding_modules: tuple[str, ...] = ()  # the outer modules that are embeddings
    # outer module -> the outer module whose base weight it shares (tied embeddings: lm_head
    # -> embed_tokens). PEFT's ensure_weight_tying then adapts it whenever the other is.
    tied_modules: Mapping[str, str] = field(default_factory=dict)
    # The serving model computes DoRA's weight norms from its base weights (loramux_kernels/dora.py)
    supports_dora: bool = False
    # safetensors key -> (layer, module, factor) of keys parsed before: every adapter of a
    # base model repeats the same few hundred keys, and parsing them is a tenth of a load.
    parsed_keys: dict[str, tuple[int, str, str]] = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {self.num_layers!r}")
        if not self.module_shapes:
            raise ValueError("module_shapes is empty")
        shapes: dict[str, tuple[int, int]] = {}
        for name, shape in self.module_shapes.items():
            in_features, out_features = shape
            if min(in_features, out_features) < 1:
                raise ValueError(f"module {name!r} has shape {shape}, expected positive sizes")
            shapes[name] = (int(in_features), int(out_features))
        packed = {name: tuple(parts) for name, parts in self.packed_modules.items()}
        for name, parts in packed.items():
            if name in shapes or not parts or any(p not in shapes for p in parts):
                raise ValueError(f"packed module {name!r} must pack serving modules, got {parts}")
            if len({shapes[p][0] for p in parts}) != 1:
                raise ValueError(f"the parts of packed module {name!r} differ in in_features")
        missing = [name for name in (*shapes, *packed) if name not in self.module_paths]
        if missing:
            raise ValueError(f"modules {missing} have no path in module_paths")
        all_linear = tuple(shapes) if self.all_linear is None else tuple(self.all_linear)
        unknown = [name for name in all_linear if name not in shapes and name not in packed]
        if unknown:
            raise ValueError(f"all_linear names unknown modules {unknown}")
        object.__setattr__(self, "module_shapes", MappingProxyType(shapes))
        object.__setattr__(self, "module_paths", MappingProxyType(dict(self.module_paths)))
        object.__setattr__(self, "packed_modules", MappingProxyType(packed))
        object.__setattr__(self, "all_linear", all_linear)
        object.__setattr__(self, "refused_modules", MappingProxyType(dict(self.refused_modules)))
        outer = {name: (int(i), int(o)) for name, (i, o) in self.outer_modules.items()}
        clash = [name for name in outer if name in shapes or name in packed or name not in self.outer_paths]
        if clash or any(name not in outer for name in self.embedding_modules):
            raise ValueError(f"outer modules {clash or list(self.embedding_modules)} need a path and a unique name")
        object.__setattr__(self, "outer_modules", MappingProxyType(outer))
        object.__setattr__(self, "outer_paths", MappingProxyType(dict(self.outer_paths)))
        object.__setattr__(self, "embedding_modules", tuple(self.embedding_modules))
        if any(a not in outer or b not in outer for a, b in self.tied_modules.items()):
            raise ValueError(f"tied_modules {dict(self.tied_modules)} must name outer modules")
        object.__setattr__(self, "tied_modules", MappingProxyType(dict(self.tied_modules)))

    def __hash__(self) -> int:  # MappingProxyType is unhashable; the spec is a fine cache key
        return hash(
            (
                self.num_layers,
                tuple(self.module_shapes.items()),
                tuple(self.module_paths.items()),
                tuple(self.packed_modules.items()),
                self.layers_prefix,
                tuple(self.outer_modules.items()),
                tuple(self.outer_paths.items()),
                tuple(self.tied_modules.items()),
                self.supports_dora,
            )
        )

    def module_name(self, layer: int, module: str) -> str:
        """PEFT's full name of a module, e.g. model.layers.3.self_attn.q_proj (or lm_head)."""
        if layer == MODEL_LEVEL:
            return self.outer_paths[module]
        return f"{self.layers_prefix}.{layer}.{self.module_paths[module]}"

    def modules(self) -> Iterator[tuple[int, str]]:
        """Every serving (layer_index, module_name), layer-major, then the outer modules
        (embed_tokens, lm_head) at layer MODEL_LEVEL."""
        for layer in range(self.num_layers):
            for module in self.module_shapes:
                yield layer, module
        for module in self.outer_modules:
            yield MODEL_LEVEL, module

    def serving_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a serving module of the layers or an outer module."""
        shape = self.module_shapes.get(module)
        return shape if shape is not None else self.outer_modules[module]

    def peft_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a serving or packed module as PEFT sees it."""
        parts = self.packed_modules.get(module)
        if parts is None:
            return self.serving_shape(module)
        return self.module_shapes[parts[0]][0], sum(self.module_shapes[p][1] for p in parts)

    def part_rows(self, packed: str, part: str) -> slice:
        """The rows of a packed module's lora_B [out, r] that belong to `part`."""
        start = 0
        for name in self.packed_modules[packed]:
            width = self.module_shapes[name][1]
            if name == part:
                return slice(start, start + width)
            start += width
        raise KeyError(part)


@dataclass(frozen=True)
class LoraAdapterConfig:
    """The parsed adapter_config.json: only what serving needs; unknown keys are ignored."""

    r: int
    lora_alpha: float
    use_rslora: bool
    # list form (a module matches its full name or a "." + entry suffix) or a regex string
    # (re.fullmatch on the full name); "all-linear" is kept as is and resolved by resolve_targets
    target_modules: tuple[str, ...] | str
    rank_pattern: Mapping[str, int]  # PEFT pattern -> rank, first match in order wins
    alpha_pattern: Mapping[str, float]  # PEFT pattern -> alpha, first match in order wins
    layers_to_transform: tuple[int, ...] | None  # None: every layer
    layers_pattern: tuple[str, ...] | None  # regexes naming the layer list; None: any
    base_model_name_or_path: str | None
    exclude_modules: tuple[str, ...] | str | None = None  # same forms as target_modules
    use_dora: bool = False  # DoRA: every adapted module has a lora_magnitude_vector
    ensure_weight_tying: bool = False  # PEFT ties lm_head's adapter to the embedding's


@dataclass(frozen=True)
class ModuleTarget:
    """Rank and scaling of one adapted serving module, from the config alone."""

    rank: int
    scaling: float
    packed: str | None = None  # the packed module whose adapter this part serves, if any


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no truth value
class LoraModuleWeights:
    """One adapted projection. Semantics: y += scaling * (x @ lora_a.T) @ lora_b.T"""

    lora_a: torch.Tensor  # [rank, in_features]  (PEFT's lora_A.weight)
    lora_b: torch.Tensor  # [out_features, rank] (PEFT's lora_B.weight)
    scaling: float  # alpha / r, or alpha / sqrt(r) with use_rslora (after rank/alpha_pattern)
    magnitude: torch.Tensor | None = None  # fp32 [out_features]: DoRA's m, None for plain LoRA


@dataclass(frozen=True, eq=False)
class StackedModuleWeights:
    """One projection adapted in every layer with one rank, all layers in one tensor per
    factor. Semantics per layer i: y += scalings[i] * (x @ lora_a[i].T) @ lora_b[i].T"""

    lora_a: torch.Tensor  # [num_layers, rank, in_features]
    lora_b: torch.Tensor  # [num_layers, out_features, rank], a transposed view (see _read_weights)
    scalings: tuple[float, ...]  # [num_layers]
    magnitudes: torch.Tensor | None = None  # fp32 [num_layers, out_features] (DoRA), else None


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A loaded, validated adapter on the CPU, in the dtype it was loaded as."""

    adapter_id: str
    config: LoraAdapterConfig
    # (layer_index, module_name) -> weights, layer-major in the spec's module order
    modules: Mapping[tuple[int, str], LoraModuleWeights]
    max_rank: int  # max rank over modules
    num_bytes: int  # bytes of all lora_a / lora_b tensors as loaded
    # module_name -> the same weights stacked over layers, for projections adapted in every
    # layer with one rank (`modules` holds views of these): the store writes them into a
    # slot of all layers at once. Other projections are in `modules` only.
    stacks: Mapping[str, StackedModuleWeights] = field(default_factory=lambda: MappingProxyType({}))


# --------------------------------------------------------------------------- config


def read_adapter_config(adapter_id: str, directory: str | Path) -> LoraAdapterConfig:
    """Parse and check `adapter_config.json` in `directory`; never opens the weights.

    Raises AdapterNotFound (no directory or config file), AdapterInvalid (bad JSON or
    values) or AdapterUnsupported (a PEFT feature loramux does not serve).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterNotFound(adapter_id, directory, "no adapter directory here")
    path = directory / CONFIG_NAME
    try:
        size = path.stat().st_size
        if size > _MAX_CONFIG_BYTES:
            raise AdapterInvalid(
                adapter_id, path, f"config is {size} bytes, more than {_MAX_CONFIG_BYTES}"
            )
        data = path.read_bytes()
    except FileNotFoundError:
        raise AdapterNotFound(adapter_id, path, f"missing {CONFIG_NAME}") from None
    except OSError as e:
        raise AdapterInvalid(adapter_id, path, f"cannot read config: {e}") from None
    try:
        raw = json.loads(data)
    # JSONDecodeError and UnicodeDecodeError are ValueErrors; deep nesting recurses.
    except (ValueError, RecursionError) as e:
        raise AdapterInvalid(adapter_id, path, f"not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise AdapterInvalid(
            adapter_id, path, f"config must be a JSON object, got {type(raw).__name__}"
        )
    return _parse_config(_Fields(raw, adapter_id, path))


class _Fields:
    """Typed reads of config values; every failure is an AdapterInvalid naming the key."""

    def __init__(self, raw: dict[str, Any], adapter_id: str, path: Path) -> None:
        self.raw = raw
        self.adapter_id = adapter_id
        self.path = path
        self.pattern_chars = 0  # over every pattern checked, against MAX_CONFIG_PATTERN_CHARS

    def invalid(self, key: str, expected: str) -> AdapterInvalid:
        got = _short(self.raw[key]) if key in self.raw else "nothing"
        return AdapterInvalid(self.adapter_id, self.path, f"{key!r} must be {expected}, got {got}")

    def unsupported(self, feature: str, key: str) -> AdapterUnsupported:
        return AdapterUnsupported(
            self.adapter_id, self.path, feature, f"{key}={_short(self.raw[key])}"
        )

    def int_(self, key: str, minimum: int, maximum: int) -> int:
        value = self.raw.get(key)
        if not _is_int(value) or not minimum <= value <= maximum:
            raise self.invalid(key, f"an integer from {minimum} to {maximum}")
        return value

    def number(self, key: str, max_abs: float) -> float:
        value = self.raw.get(key)
        if not _is_finite_number(value) or abs(value) > max_abs:
            raise self.invalid(key, f"a finite number within +-{max_abs:g}")
        return float(value)

    def bool_(self, key: str, default: bool) -> bool:
        value = self.raw.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.invalid(key, "true or false")
        return value

    def optional_str(self, key: str) -> str | None:
        value = self.raw.get(key)
        if value is not None and not isinstance(value, str):
            raise self.invalid(key, "a string or null")
        return value

    def names(self, key: str) -> tuple[str, ...] | str | None:
        """A regex string, a list of names, or None."""
        value = self.raw.get(key)
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            if len(value) > MAX_CONFIG_ENTRIES:
                raise self.invalid(key, f"at most {MAX_CONFIG_ENTRIES} names")
            return tuple(value)
        raise self.invalid(key, "a string, a list of strings or null")

    def pattern_map(self, key: str, valid: Any, expected: str) -> dict[str, Any]:
        value = self.raw.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(valid(v) for v in value.values()):
            raise self.invalid(key, f"an object of pattern -> {expected}")
        if len(value) > MAX_CONFIG_ENTRIES:
            raise self.invalid(key, f"at most {MAX_CONFIG_ENTRIES} patterns")
        for pattern in value:
            self.check_regex(key, rf"(.*\.)?({pattern})$")
        return value

    def check_regex(self, key: str, pattern: str) -> None:
        self.pattern_chars += len(pattern)
        if self.pattern_chars > MAX_CONFIG_PATTERN_CHARS:
            raise AdapterInvalid(
                self.adapter_id,
                self.path,
                f"the config's regex patterns ({key!r} and those before it) are longer than "
                f"{MAX_CONFIG_PATTERN_CHARS} characters in all",
            )
        problem = check_pattern(pattern)
        if problem is not None:
            raise AdapterInvalid(
                self.adapter_id, self.path, f"{key!r} holds a bad regex {_short(pattern)}: {problem}"
            )


def _parse_config(f: _Fields) -> LoraAdapterConfig:
    raw = f.raw
    # Features first: an adapter we will never serve should say so, not fail on a detail.
    peft_type = raw.get("peft_type", "LORA")  # PEFT's LoraConfig loads configs without it
    if not isinstance(peft_type, str):
        raise f.invalid("peft_type", "a string")
    if peft_type.upper() != "LORA":
        raise AdapterUnsupported(f.adapter_id, f.path, f"non-LoRA PEFT type {peft_type!r}")
    for key, feature in _UNSUPPORTED_KEYS:
        if raw.get(key):
            raise f.unsupported(feature, key)
    bias = raw.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise f.invalid("bias", "'none', 'all' or 'lora_only'")
    if bias != "none":
        raise f.unsupported("bias != 'none'", "bias")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise AdapterUnsupported(
            f.adapter_id,
            f.path,
            f"{init} initialization",
            "it modifies the base weights, which all adapters share",
        )

    r = f.int_("r", 1, MAX_RANK_VALUE)
    lora_alpha = f.number("lora_alpha", MAX_ABS_LORA_ALPHA)
    use_rslora = f.bool_("use_rslora", False)

    target_modules = f.names("target_modules")
    if target_modules is None or target_modules == () or target_modules == "":
        raise f.invalid("target_modules", "a non-empty list of module names or a regex")
    exclude_modules = f.names("exclude_modules")
    for key, names in (("target_modules", target_modules), ("exclude_modules", exclude_modules)):
        if isinstance(names, str):
            f.check_regex(key, names)

    rank_pattern = f.pattern_map(
        "rank_pattern",
        lambda v: _is_int(v) and 1 <= v <= MAX_RANK_VALUE,
        f"rank from 1 to {MAX_RANK_VALUE}",
    )
    alpha_pattern = f.pattern_map(
        "alpha_pattern",
        lambda v: _is_finite_number(v) and abs(v) <= MAX_ABS_LORA_ALPHA,
        f"finite alpha within +-{MAX_ABS_LORA_ALPHA:g}",
    )

    # PEFT's own LoraConfig.__post_init__ checks, on the raw values.
    raw_layers, raw_pattern = raw.get("layers_to_transform"), raw.get("layers_pattern")
    if isinstance(target_modules, str) and (raw_layers is not None or raw_pattern is not None):
        raise AdapterInvalid(
            f.adapter_id,
            f.path,
            "layers_to_transform / layers_pattern cannot be used with a regex target_modules",
        )
    if raw_pattern and raw_layers is None:
        raise AdapterInvalid(
            f.adapter_id, f.path, "layers_pattern is set but layers_to_transform is not"
        )

    layers_to_transform: tuple[int, ...] | None
    if raw_layers is None or raw_layers == []:
        layers_to_transform = None  # PEFT treats [] like None: every layer
    elif _is_int(raw_layers) and 0 <= raw_layers <= MAX_LAYER_INDEX:
        layers_to_transform = (raw_layers,)
    elif (
        isinstance(raw_layers, list)
        and len(raw_layers) <= MAX_CONFIG_ENTRIES
        and all(_is_int(i) and 0 <= i <= MAX_LAYER_INDEX for i in raw_layers)
    ):
        layers_to_transform = tuple(raw_layers)
    else:
        raise f.invalid(
            "layers_to_transform",
            f"a layer index from 0 to {MAX_LAYER_INDEX}, a list of at most "
            f"{MAX_CONFIG_ENTRIES} of them or null",
        )

    layers_pattern = f.names("layers_pattern")
    if isinstance(layers_pattern, str):
        layers_pattern = (layers_pattern,)
    if not layers_pattern:
        layers_pattern = None  # PEFT: an empty layers_pattern accepts any layer list
    for pattern in layers_pattern or ():
        f.check_regex("layers_pattern", pattern)

    return LoraAdapterConfig(
        r=r,
        lora_alpha=lora_alpha,
        use_rslora=use_rslora,
        target_modules=target_modules,
        rank_pattern=MappingProxyType(dict(rank_pattern)),
        alpha_pattern=MappingProxyType({k: float(v) for k, v in alpha_pattern.items()}),
        layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern,
        base_model_name_or_path=f.optional_str("base_model_name_or_path"),
        exclude_modules=exclude_modules,
        use_dora=f.bool_("use_dora", False),
        ensure_weight_tying=f.bool_("ensure_weight_tying", False),
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- targets


def resolve_targets(
    adapter_id: str,
    config: LoraAdapterConfig,
    spec: BaseModelSpec,
    path: str | Path | None = None,
) -> dict[tuple[int, str], ModuleTarget]:
    """Which projections the config adapts, with each one's rank and scaling.

    Needs only the config (no weights), so a store can size an adapter before loading it.
    `path` (the config file) is only used in error messages.

    Semantics (PEFT's, per full module name n such as model.layers.3.self_attn.q_proj):
        targeted(n) = n matches target_modules and not exclude_modules (and layers_to_transform)
        rank(n)  = rank_pattern[first key k in order with re.match(rf"(.*\\.)?({k})$", n)] else r
        alpha(n) = alpha_pattern[... same rule ...] else lora_alpha
        scaling(n) = alpha(n) / sqrt(rank(n)) if use_rslora else alpha(n) / rank(n)

    Raises AdapterUnsupported for what the model does not serve (a refused module, DoRA
    where the model declares no support, DoRA on an embedding), and AdapterInvalid when
    nothing of the base model is targeted.
    """
    matcher = PatternMatcher(adapter_id, path)  # one time budget for all of its matches
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        # PEFT resolves "all-linear" to every nn.Linear but the output head; the model
        # declares which of its modules those are. A set of exact names: every candidate
        # below is looked up in it (a tuple of 210 names made that a quadratic scan).
        targets = frozenset(
            spec.module_name(layer, module) for layer in range(spec.num_layers) for module in spec.all_linear
        )

    for name, feature in spec.refused_modules.items():
        if _is_targeted(matcher, config, targets, name):
            raise AdapterUnsupported(adapter_id, path, feature, f"target_modules matches {name}")
    if config.use_dora and not spec.supports_dora:
        raise AdapterUnsupported(adapter_id, path, "DoRA", "this base model's serving code declares no DoRA support")

    resolved: dict[tuple[int, str], ModuleTarget] = {}
    candidates = [
        *((layer, module) for layer in range(spec.num_layers) for module in (*spec.module_shapes, *spec.packed_modules)),
        *((MODEL_LEVEL, module) for module in spec.outer_modules),
    ]
    for layer, module in candidates:
        name = spec.module_name(layer, module)
        if not _is_targeted(matcher, config, targets, name) and not _tied_target(matcher, config, targets, spec, module):
            continue
        if layer == MODEL_LEVEL:
            _check_outer_target(adapter_id, path, config, spec, module, name)
        rank = _pattern_value(matcher, "rank_pattern", config.rank_pattern, name, config.r)
        alpha = _pattern_value(
            matcher, "alpha_pattern", config.alpha_pattern, name, config.lora_alpha
        )
        scaling = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        parts = spec.packed_modules.get(module)
        for part in parts or (module,):
            if (layer, part) in resolved:
                raise AdapterInvalid(
                    adapter_id,
                    path,
                    f"target_modules adapts both {name} and its part {spec.module_name(layer, part)}",
                )
            resolved[(layer, part)] = ModuleTarget(rank, scaling, module if parts else None)
    # Layer-major in the spec's serving-module order, whatever matched first.
    order = {key: i for i, key in enumerate(spec.modules())}
    resolved = dict(sorted(resolved.items(), key=lambda item: order[item[0]]))
    if not resolved:
        layers = ""
        if config.layers_to_transform is not None:
            layers = f" in layers_to_transform {list(config.layers_to_transform)}"
            if config.layers_pattern is not None:
                layers += f" under layers_pattern {list(config.layers_pattern)}"
        raise AdapterInvalid(
            adapter_id,
            path,
            f"target_modules {_short(config.target_modules)}{layers} match no projection of "
            f"the base model ({', '.join(spec.module_shapes)} in {spec.num_layers} layers)",
        )
    return resolved


def _tied_target(
    matcher: PatternMatcher, config: LoraAdapterConfig, targets: tuple[str, ...] | frozenset[str] | str, spec: BaseModelSpec, module: str
) -> bool:
    """PEFT's ensure_weight_tying on tied embeddings: lm_head is adapted (with the embedding's
    factors, transposed, which PEFT saves as lm_head's own) whenever embed_tokens is."""
    source = spec.tied_modules.get(module)
    return (
        config.ensure_weight_tying
        and source is not None
        and _is_targeted(matcher, config, targets, spec.module_name(MODEL_LEVEL, source))
    )


def _check_outer_target(
    adapter_id: str, path: str | Path | None, config: LoraAdapterConfig, spec: BaseModelSpec, module: str, name: str
) -> None:
    """Refuse what loramux does not serve on embed_tokens / lm_head."""
    if config.use_dora and module in spec.embedding_modules:
        raise AdapterUnsupported(adapter_id, path, "DoRA on an embedding", f"target_modules matches {name}")


def _matches_names(
    matcher: PatternMatcher, key: str, names: tuple[str, ...] | frozenset[str] | str, name: str
) -> bool:
    """PEFT's module-name rule: regex fullmatch, or equal to / ends with "." + an entry.
    A frozenset holds exact full names ("all-linear" resolved): membership only."""
    if isinstance(names, str):
        return matcher.fullmatch(key, names, name)
    if isinstance(names, frozenset):
        return name in names
    return name in names or any(name.endswith("." + entry) for entry in names)


def _is_targeted(
    matcher: PatternMatcher,
    config: LoraAdapterConfig,
    targets: tuple[str, ...] | frozenset[str] | str,
    name: str,
) -> bool:
    """Port of peft's check_target_module_exists (modules_to_save is refused earlier)."""
    if config.exclude_modules and _matches_names(
        matcher, "exclude_modules", config.exclude_modules, name
    ):
        return False
    if not _matches_names(matcher, "target_modules", targets, name):
        return False
    # PEFT applies layers_to_transform to list targets only (LoraConfig forbids it with a regex).
    if isinstance(targets, str) or config.layers_to_transform is None:
        return True
    layer_index = _layer_index(matcher, name, config.layers_pattern)
    return layer_index is not None and layer_index in config.layers_to_transform


def _layer_index(
    matcher: PatternMatcher, name: str, layers_pattern: tuple[str, ...] | None
) -> int | None:
    """The first numbered segment after the layer list, as PEFT finds it (lazy: first index)."""
    if layers_pattern is None:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in layers_pattern:
            match = matcher.match(
                "layers_pattern", rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name
            )
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _pattern_value(
    matcher: PatternMatcher, config_key: str, patterns: Mapping[str, Any], name: str, default: Any
) -> Any:
    """Port of peft's get_pattern_key + dict lookup: the first key (in order) that matches wins."""
    for key, value in patterns.items():
        if matcher.match(config_key, rf"(.*\.)?({key})$", name):
            return value
    return patterns.get(name, default)  # PEFT falls back to the name itself as a key


# --------------------------------------------------------------------------- weights


def load_adapter(
    adapter_id: str,
    directory: str | Path,
    spec: BaseModelSpec,
    max_rank: int,
    dtype: torch.dtype = torch.float32,
    alloc: HostAlloc = fresh_alloc,
) -> LoraAdapter:
    """Read config and safetensors weights, check them against `spec`, convert to `dtype`.

    All the weights live in one block from `alloc` (the CPU tier's arena in the store).

    Raises AdapterNotFound, AdapterInvalid, AdapterTooLarge (a rank > max_rank) or
    AdapterUnsupported; never a raw JSON / safetensors / OS error.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating type, got {dtype}")
    directory = Path(directory)
    config = read_adapter_config(adapter_id, directory)
    config_path = directory / CONFIG_NAME
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.exists():
        if (directory / PICKLED_WEIGHTS_NAME).exists():
            raise AdapterUnsupported(
                adapter_id,
                directory / PICKLED_WEIGHTS_NAME,
                f"pickled weights ({PICKLED_WEIGHTS_NAME})",
                f"convert it to {WEIGHTS_NAME}",
            )
        raise AdapterNotFound(adapter_id, weights_path, f"missing {WEIGHTS_NAME}")

    # Rank limits come from the config alone: refuse before reading any weights.
    targets = resolve_targets(adapter_id, config, spec, config_path)
    (layer, module), largest = max(targets.items(), key=lambda item: item[1].rank)
    if largest.rank > max_rank:
        raise AdapterTooLarge(
            adapter_id, config_path, largest.rank, max_rank, spec.module_name(layer, module)
        )
    check_scalings(
        adapter_id,
        config_path,
        {spec.module_name(*key): target.scaling for key, target in targets.items()},
        dtype,
    )

    try:
        modules, stacks = _read_weights(adapter_id, weights_path, spec, targets, dtype, config.use_dora, alloc)
    except SafetensorError as e:
        raise AdapterInvalid(
            adapter_id, weights_path, f"not a valid safetensors file: {e}"
        ) from None
    except MisalignedTensor as e:
        raise AdapterInvalid(adapter_id, weights_path, f"unaligned tensor data: {e}") from None
    except FileChanged as e:
        raise AdapterInvalid(adapter_id, weights_path, f"the file changed while it was read: {e}") from None
    except FileNotFoundError:  # removed since the exists() check
        raise AdapterNotFound(adapter_id, weights_path, f"missing {WEIGHTS_NAME}") from None
    except OSError as e:
        raise AdapterInvalid(adapter_id, weights_path, f"cannot read weights: {e}") from None

    return LoraAdapter(
        adapter_id=adapter_id,
        config=config,
        modules=MappingProxyType(modules),
        max_rank=largest.rank,
        num_bytes=sum(
            _nbytes(w.lora_a) + _nbytes(w.lora_b) + (0 if w.magnitude is None else _nbytes(w.magnitude))
            for w in modules.values()
        ),
        stacks=MappingProxyType(stacks),
    )


def _read_weights(
    adapter_id: str,
    path: Path,
    spec: BaseModelSpec,
    targets: Mapping[tuple[int, str], ModuleTarget],
    dtype: torch.dtype,
    use_dora: bool,
    alloc: HostAlloc,
) -> tuple[dict[tuple[int, str], LoraModuleWeights], dict[str, StackedModuleWeights]]:
    """(modules, stacks) as LoraAdapter holds them, all in one block from `alloc`."""

    def invalid(reason: str) -> AdapterInvalid:
        return AdapterInvalid(adapter_id, path, reason)

    # safe_open checks the header (JSON, dtypes, offsets, file size) up front; tensor data
    # is read only by get_tensor.
    with safe_open(path, framework="pt", device="cpu") as f:
        stored = SafetensorsViews(path)  # safe_open has validated the header
        # 1. Map every key to its (layer, module) and check dtype and shape from the header
        #    alone, so a wrong adapter is refused before any tensor data is read.
        # (layer, PEFT module) -> {"A"|"B"|"M": key}; a packed module's tensors serve its parts
        sources = {(layer, t.packed or module): t for (layer, module), t in targets.items()}
        keys: dict[tuple[int, str], dict[str, str]] = {}
        names = f.keys()
        # A header of a million keys is refused at once, not key by key (2 per projection
        # of the whole model, doubled, leaves room for the precise messages below).
        max_keys = 4 * sum(1 for _ in spec.modules())
        if len(names) > max_keys:
            raise invalid(
                f"the file holds {len(names)} tensors, more than the {max_keys} an adapter "
                "of this base model can have"
            )
        for key in names:
            layer, module, factor = _parse_tensor_key(adapter_id, path, key, spec)
            target = sources.get((layer, module))
            if target is None:
                name = spec.module_name(layer, module)
                raise invalid(f"tensor {key!r} is for {name}, which target_modules does not target")
            if factor == "M" and not use_dora:
                raise invalid(f"tensor {key!r} is a DoRA magnitude, but adapter_config.json has no use_dora")
            if factor == "W":
                _check_base_copy(f, key, spec, module, invalid)
                continue
            pair = keys.setdefault((layer, module), {})
            if factor in pair:
                raise invalid(
                    f"tensors {pair[factor]!r} and {key!r} are both lora_{factor} of "
                    f"{spec.module_name(layer, module)}"
                )
            pair[factor] = key

            stored_dtype, shape = stored.entry(key)
            if stored_dtype not in _FLOAT_DTYPES:
                raise invalid(
                    f"tensor {key!r} has dtype {stored_dtype}, expected one of {', '.join(_FLOAT_DTYPES)}"
                )
            in_features, out_features = spec.peft_shape(module)
            expected = (
                [target.rank, in_features] if factor == "A"
                else [out_features, target.rank] if factor == "B"
                else [out_features]
            )
            if shape != expected:
                raise invalid(
                    f"tensor {key!r} has shape {shape}, expected {expected} = {_PEFT_LAYOUTS[factor]} "
                    f"of {spec.module_name(layer, module)} with rank {target.rank} from adapter_config.json"
                )

        for layer, module in sources:
            for factor in "ABM" if use_dora else "AB":
                if factor not in keys.get((layer, module), {}):
                    what = "lora_magnitude_vector" if factor == "M" else f"lora_{factor}"
                    raise invalid(
                        f"no {what} tensor for {spec.module_name(layer, module)}, "
                        "which target_modules targets"
                    )

        # 2. Copy out and convert. The stored tensors are views of the file's mapping;
        #    the copies make the CPU tier own its memory, so a file overwritten in place
        #    never changes (or faults) a loaded adapter. Projections adapted in every layer
        #    with one rank go into one tensor per factor (StackedModuleWeights), and
        #    `modules` gets views of them.
        # 3. Refuse non-finite values. A NaN or inf anywhere makes its tensor's sum NaN or
        #    inf, so one reduction per tensor or stack (no temporaries) and one check at the
        #    end prove every value finite; only when that fails (a bad value, or a sum that
        #    overflowed) are the tensors checked one by one, in order.
        # (layer, module) -> (A [rank, in], B [out, rank], DoRA m [out] or None): views of the file
        views: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        for (layer, module), target in targets.items():
            pair = keys[(layer, target.packed or module)]
            stored_a = stored.get(pair["A"])  # [rank, in_features]
            stored_b = stored.get(pair["B"])  # [out_features, rank] (of the packed module)
            # DoRA's m stays fp32 whatever the serving dtype: the norms are fp32 (loramux_kernels/dora.py)
            stored_m = stored.get(pair["M"]) if use_dora else None  # [out_features]
            if target.packed is not None:
                rows = spec.part_rows(target.packed, module)
                stored_b = stored_b[rows]
                stored_m = None if stored_m is None else stored_m[rows]
            views[(layer, module)] = stored_a, stored_b, stored_m
        stack_shapes = {
            # [num_layers, out_features, rank] as PEFT has it, stored as the transpose of
            # a contiguous [num_layers, rank, out_features]: the device buffers' layout,
            # so a CPU -> device load is a straight copy (the transpose is paid once,
            # while reading the file).
            module: ((spec.num_layers, rank, in_features), (spec.num_layers, rank, out_features))
            for module, (in_features, out_features) in spec.module_shapes.items()
            if (rank := _uniform_rank(targets, module, spec.num_layers)) is not None
        }
        single = [key for key in targets if key[1] not in stack_shapes]
        planned = [(shape, dtype) for pair in stack_shapes.values() for shape in pair] + [
            (tuple(t.shape), dtype) for key in single for t in views[key][:2]
        ]
        if use_dora:
            planned += [((shape[0], shape[2]), torch.float32) for _, shape in stack_shapes.values()]
            planned += [(tuple(views[key][2].shape), torch.float32) for key in single]
        carver = BlockCarver(alloc(BlockCarver.nbytes(planned)))
        # Carving order does not matter: every tensor takes its own aligned piece of the block.
        stacks = {
            module: StackedModuleWeights(
                carver.take(a_shape, dtype),
                carver.take(b_shape, dtype).transpose(1, 2),
                tuple(targets[(layer, module)].scaling for layer in range(spec.num_layers)),
                carver.take((b_shape[0], b_shape[2]), torch.float32) if use_dora else None,
            )
            for module, (a_shape, b_shape) in stack_shapes.items()
        }
        modules: dict[tuple[int, str], LoraModuleWeights] = {}
        read: list[tuple[str, torch.Tensor]] = []  # (key, tensor as loaded), in read order
        sums: list[torch.Tensor] = []
        accumulate = torch.float64 if dtype == torch.float64 else torch.float32
        for (layer, module), target in targets.items():
            pair = keys[(layer, target.packed or module)]
            stored_a, stored_b, stored_m = views[(layer, module)]
            stack = stacks.get(module)
            magnitude = None
            if stack is None:
                lora_a = carver.take(stored_a.shape, dtype).copy_(stored_a)
                lora_b = carver.take(stored_b.shape, dtype).copy_(stored_b)
                sums += (lora_a.sum(dtype=accumulate), lora_b.sum(dtype=accumulate))
                if stored_m is not None:
                    magnitude = carver.take(stored_m.shape, torch.float32).copy_(stored_m)
                    sums.append(magnitude.sum())
            else:  # copied below, all layers at once
                lora_a, lora_b = stack.lora_a[layer], stack.lora_b[layer]
                if stored_m is not None:
                    magnitude = stack.magnitudes[layer]
            read += ((pair["A"], lora_a), (pair["B"], lora_b))
            if magnitude is not None:
                read.append((pair["M"], magnitude))
            modules[(layer, module)] = LoraModuleWeights(lora_a, lora_b, target.scaling, magnitude)
        for module, stack in stacks.items():
            # One torch.stack per factor instead of a copy_ per layer (420 calls for an
            # all-linear adapter of 30 layers): the per-call overhead was most of the copy.
            layers = [views[(layer, module)] for layer in range(spec.num_layers)]
            torch.stack([a for a, _, _ in layers], out=stack.lora_a)
            torch.stack([b.t() for _, b, _ in layers], out=stack.lora_b.transpose(1, 2))  # [L, rank, out]
            if stack.magnitudes is not None:
                torch.stack([m for _, _, m in layers], out=stack.magnitudes)
            sums += (stack.lora_a.sum(dtype=accumulate), stack.lora_b.sum(dtype=accumulate))
            if stack.magnitudes is not None:
                sums.append(stack.magnitudes.sum())
        if sums and not bool(torch.isfinite(torch.stack(sums)).all()):
            for key, tensor in read:
                _check_finite(f, key, tensor, tensor.dtype, invalid)
        # 4. The store folds each scaling into lora_B in `dtype`: refuse what overflows.
        for module, stack in stacks.items():
            check_scaled_lora_b(stack.lora_b, stack.scalings, f"{module} in every layer", invalid)
        for (layer, module), weights in modules.items():
            if module not in stacks:
                check_scaled_lora_b(
                    weights.lora_b, weights.scaling, spec.module_name(layer, module), invalid
                )
    return modules, stacks


_PEFT_LAYOUTS = {"A": "[rank, in_features]", "B": "[out_features, rank]", "M": "[out_features]"}


def _uniform_rank(
    targets: Mapping[tuple[int, str], ModuleTarget], module: str, num_layers: int
) -> int | None:
    """The rank of `module` when the config adapts it in every layer with one rank, else None."""
    layers = [targets.get((layer, module)) for layer in range(num_layers)]
    if any(target is None for target in layers) or len({t.rank for t in layers}) != 1:
        return None
    return layers[0].rank


MAX_PARSED_KEYS = 16384  # bounds BaseModelSpec.parsed_keys (only valid keys are kept)


def _parse_tensor_key(
    adapter_id: str, path: Path, key: str, spec: BaseModelSpec
) -> tuple[int, str, str]:
    """(layer_index, module_name, factor) of a safetensors key, or a typed error."""
    parsed = spec.parsed_keys.get(key)
    if parsed is None:
        parsed = _parse_new_tensor_key(adapter_id, path, key, spec)
        if len(spec.parsed_keys) < MAX_PARSED_KEYS:
            spec.parsed_keys[key] = parsed
    return parsed


def warm_parsed_keys(spec: BaseModelSpec) -> None:
    """Parse the keys PEFT writes for every projection of `spec` (lora_A / lora_B of each
    layer's modules) into spec.parsed_keys, so the first adapter a server loads does not
    pay ~12 us of pattern matching per tensor (~5 ms for an all-linear adapter of 30
    layers) that every later one skips. Names the spec refuses are left out."""
    for layer, module in spec.modules():
        for factor in "AB":
            key = f"base_model.model.{spec.module_name(layer, module)}.lora_{factor}.weight"
            try:
                _parse_tensor_key("", Path(), key, spec)
            except AdapterError:
                continue


def _parse_new_tensor_key(
    adapter_id: str, path: Path, key: str, spec: BaseModelSpec
) -> tuple[int, str, str]:
    """(layer_index, module_name, factor) of a safetensors key, or a typed error.

    factor: "A" / "B" (the LoRA factors), "M" (DoRA's magnitude) or "W" (the copy of an
    embedding or lm_head base weight PEFT saves beside its adapter)."""
    for pattern, feature in _UNSUPPORTED_KEY_PATTERNS:
        if pattern.search(key):
            raise AdapterUnsupported(adapter_id, path, feature, f"tensor {key!r}")
    outer = _parse_outer_key(adapter_id, path, key, spec)
    if outer is not None:
        return outer
    for name, feature in spec.refused_modules.items():
        # PEFT's key of a module outside the layers: <prefix>.<name>.lora_A.weight, or the
        # saved layer itself (<prefix>.<name>.weight) when the embeddings were resized.
        if re.search(rf"(?:^|\.){re.escape(name)}\.(?:lora_|weight$)", key):
            what = feature if ".lora_" in key else "saved embedding layers"
            raise AdapterUnsupported(adapter_id, path, what, f"tensor {key!r}")
    match = _LORA_KEY.fullmatch(key)
    if match is None:
        raise AdapterInvalid(
            adapter_id,
            path,
            f"unexpected tensor {key!r}; expected "
            f"'base_model.model.{spec.layers_prefix}.<i>.<block>.<proj>.lora_A.weight' or lora_B",
        )
    layer = int(match.group("layer"))
    factor = "M" if match.group("magnitude") else match.group("factor")
    module = match.group("path").rsplit(".", 1)[-1]
    if spec.module_paths.get(module) != match.group("path") or not (
        module in spec.module_shapes or module in spec.packed_modules
    ):
        known = ", ".join(spec.module_paths[m] for m in (*spec.module_shapes, *spec.packed_modules))
        raise AdapterInvalid(
            adapter_id,
            path,
            f"tensor {key!r} is for {match.group('path')!r}, not a projection of the base "
            f"model ({known})",
        )
    if layer >= spec.num_layers:
        raise AdapterInvalid(
            adapter_id,
            path,
            f"tensor {key!r} is for layer {layer}, but the base model has {spec.num_layers} layers",
        )
    return layer, module, factor


def _parse_outer_key(
    adapter_id: str, path: Path, key: str, spec: BaseModelSpec
) -> tuple[int, str, str] | None:
    """(MODEL_LEVEL, module, factor) of a key of an outer module (embed_tokens, lm_head), or
    None when the key names none of them."""
    for module, full_name in spec.outer_paths.items():
        prefix = next((p for p in ("base_model.model." + full_name + ".", full_name + ".") if key.startswith(p)), None)
        if prefix is None:
            continue
        match = _OUTER_TENSOR.fullmatch(key[len(prefix) :])
        embedding = module in spec.embedding_modules
        if match is None or (match.group("factor") and embedding) or (match.group("embedding") and not embedding):
            expected = "lora_embedding_A / lora_embedding_B" if embedding else "lora_A.weight / lora_B.weight"
            raise AdapterInvalid(adapter_id, path, f"unexpected tensor {key!r}; {full_name} takes {expected}")
        if match.group("whole"):
            raise AdapterUnsupported(adapter_id, path, MODULES_TO_SAVE, f"tensor {key!r} replaces {full_name}")
        if match.group("magnitude"):
            return MODEL_LEVEL, module, "M"
        if match.group("base"):
            return MODEL_LEVEL, module, "W"
        return MODEL_LEVEL, module, match.group("factor") or match.group("embedding")
    return None


def _check_base_copy(f: Any, key: str, spec: BaseModelSpec, module: str, invalid: Callable[[str], AdapterInvalid]) -> None:
    """PEFT saves embed_tokens' / lm_head's base weight beside their adapter
    (save_embedding_layers="auto"). A copy of the base model's shape is the base weight,
    frozen while the adapter trained, and is not read; another shape means a resized
    vocabulary, which the shared base model cannot serve."""
    in_features, out_features = spec.serving_shape(module)
    # nn.Embedding's weight is [num_embeddings, dim] = [in, out]; nn.Linear's is [out, in]
    expected = [in_features, out_features] if module in spec.embedding_modules else [out_features, in_features]
    shape = list(f.get_slice(key).get_shape())
    if shape != expected:
        raise invalid(
            f"tensor {key!r} has shape {shape}, but the base model's {spec.outer_paths[module]} is "
            f"{expected}: adapters that resize the vocabulary are not supported"
        )


def _check_finite(
    f: Any,
    key: str,
    tensor: torch.Tensor,
    dtype: torch.dtype,
    invalid: Callable[[str], AdapterInvalid],
) -> None:
    """Refuse `tensor` (the file's `key` converted to `dtype`) if any value is NaN or inf."""
    if torch.isfinite(tensor).all():
        return
    # Tell a NaN/inf in the file from a value that overflowed the serving dtype.
    stored = f.get_tensor(key)
    if stored.dtype != dtype and torch.isfinite(stored).all():
        raise invalid(f"tensor {key!r} has values out of range for {dtype}")
    raise invalid(f"tensor {key!r} contains NaN or inf")


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
