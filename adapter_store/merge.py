"""Adapter composition: LoRAX's `merged_adapters`, as one derived LoRA adapter.

A merge spec names source adapters, a weight each and a strategy:

    linear        task arithmetic: sum_i w_i * t_i
    ties          keep the top `density` fraction of each t_i by magnitude, elect a sign per
                  entry (`majority_sign_method`: total = sign of the sum, frequency = sign of
                  the count), average the weighted entries that agree with it
    dare_linear   drop entries of each t_i at random (keep with probability `density`,
                  rescale by 1 / density), then linear
    dare_ties     the same random drop, then ties' sign election and disjoint average

The strategies run on each factor separately, per adapted projection, as LoRAX's
`merge_adapters` and peft's `add_weighted_adapter` do (same rank required), with peft's
weighting, so that one adapter of weight w gives exactly w times its delta:

    lora_A = strategy([A_i], sign(w_i s_i) sqrt|w_i s_i|)     [rank, in_features]
    lora_B = strategy([B_i], sqrt|w_i s_i|)                   [out_features, rank]
    scaling = 1                                                (s_i: each source's own scaling)

A projection only some sources adapt merges those sources (the targets are the union).
Everything is computed in float32 whatever the serving dtype. DARE's random masks come
from a generator seeded by the spec's hash and the projection, so the same spec always
gives the same adapter (on every replica, after every eviction). peft's own merge_utils
draw from torch's global generator, which a server shared by threads cannot seed per
merge; the tests check these functions against them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch

from loramux.adapter_store.format import LoraAdapter, LoraAdapterConfig, LoraModuleWeights

STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")
MAX_ABS_WEIGHT = 1e3  # a merge weight beyond this is a typo, and would overflow bf16 slots


class MergeSpecInvalid(ValueError):
    """A merge spec that cannot be served; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class MergeSpec:
    """One `merged_adapters` request field, checked (`check`) and canonical (defaults filled)."""

    ids: tuple[str, ...]
    weights: tuple[float, ...]  # one per id
    merge_strategy: str = "linear"
    density: float = 1.0  # fraction of entries kept (ties / dare_*); 1 keeps all
    majority_sign_method: str = "total"

    @classmethod
    def create(
        cls,
        ids: Sequence[str],
        weights: Sequence[float] | None = None,
        merge_strategy: str = "linear",
        density: float = 1.0,
        majority_sign_method: str = "total",
        max_ids: int = 8,
    ) -> MergeSpec:
        """A checked spec; weights default to 1 each (LoRAX). Raises MergeSpecInvalid."""
        if not isinstance(ids, (list, tuple)) or not ids:
            raise MergeSpecInvalid("ids", "ids must be a non-empty list of adapter ids")
        if len(ids) > max_ids:
            raise MergeSpecInvalid("ids", f"ids names {len(ids)} adapters; at most {max_ids} may be merged")
        if any(not isinstance(i, str) for i in ids):
            raise MergeSpecInvalid("ids", "ids must be strings")
        if len(set(ids)) != len(ids):
            raise MergeSpecInvalid("ids", "ids must not repeat an adapter (give it a larger weight instead)")
        if weights is None or len(weights) == 0:
            weights = [1.0] * len(ids)
        if len(weights) != len(ids):
            raise MergeSpecInvalid("weights", f"weights has {len(weights)} entries for {len(ids)} ids")
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise MergeSpecInvalid("weights", "weights must be finite numbers")
            if abs(w) > MAX_ABS_WEIGHT:
                raise MergeSpecInvalid("weights", f"weights must be within +-{MAX_ABS_WEIGHT:g}")
        if all(w == 0 for w in weights):
            raise MergeSpecInvalid("weights", "at least one weight must be non-zero")
        if merge_strategy not in STRATEGIES:
            raise MergeSpecInvalid("merge_strategy", f"merge_strategy must be one of {list(STRATEGIES)}")
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise MergeSpecInvalid("density", "density must be a number in (0, 1]")
        if majority_sign_method not in SIGN_METHODS:
            raise MergeSpecInvalid(
                "majority_sign_method", f"majority_sign_method must be one of {list(SIGN_METHODS)}"
            )
        if merge_strategy == "linear":
            density, majority_sign_method = 1.0, "total"  # unused by linear: one canonical spec
        elif merge_strategy == "dare_linear":
            majority_sign_method = "total"
        return cls(tuple(ids), tuple(float(w) for w in weights), merge_strategy, float(density),
                   majority_sign_method)

    def canonical_json(self, versions: Sequence[int] | None = None) -> str:
        """The spec (and the sources' versions) as one canonical string: the cache key's input."""
        body = {
            "ids": list(self.ids),
            "weights": [repr(w) for w in self.weights],  # repr: exact, -0.0 and 0.0 differ
            "merge_strategy": self.merge_strategy,
            "density": repr(self.density),
            "majority_sign_method": self.majority_sign_method,
        }
        if versions is not None:
            body["versions"] = list(versions)
        return json.dumps(body, sort_keys=True, separators=(",", ":"))

    def digest(self, versions: Sequence[int] | None = None) -> str:
        return hashlib.sha256(self.canonical_json(versions).encode()).hexdigest()


def projection_seed(spec: MergeSpec, layer: int, module: str, factor: str) -> int:
    """DARE's seed for one factor ("A" or "B") of one projection: from the spec alone (the
    sources' versions change the weights, not the draw), 63 bits."""
    text = f"{spec.canonical_json()}|{layer}|{module}|{factor}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


# --------------------------------------------------------------------------- strategies


def magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) entries of largest |t|, zero the rest."""
    if density >= 1:
        return t
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices] = 1
    return t * mask.reshape(t.shape)


def random_prune(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability `density`, rescaled by 1 / density (DARE)."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """[n, ...] -> bool [n, ...]: where each task's sign agrees with the elected sign."""
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0)
    return sign == elected


def merge_factor(
    tensors: Sequence[torch.Tensor],  # n x [rows, cols], float32
    weights: torch.Tensor,  # [n]
    spec: MergeSpec,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One factor of one projection merged by the spec's strategy -> [rows, cols]."""
    strategy = spec.merge_strategy
    if strategy in ("ties",):
        tensors = [magnitude_prune(t, spec.density) for t in tensors]
    elif strategy in ("dare_linear", "dare_ties"):
        assert generator is not None
        tensors = [random_prune(t, spec.density, generator) for t in tensors]
    stacked = torch.stack(list(tensors))  # [n, rows, cols]
    weighted = stacked * weights.view(-1, 1, 1)
    if strategy in ("linear", "dare_linear"):
        return weighted.sum(dim=0)
    mask = majority_sign_mask(stacked, spec.majority_sign_method)  # elected before weighting
    return (weighted * mask).sum(dim=0) / mask.sum(dim=0).clamp(min=1)


# --------------------------------------------------------------------------- adapters


def check_compatible(
    ids: Sequence[str], ranks: Sequence[Mapping[tuple[int, str], int]]
) -> dict[tuple[int, str], int]:
    """Per source, (layer, module) -> rank; every projection must have one rank across the
    sources adapting it (a merge adds factors entry by entry). Returns the union's ranks."""
    union: dict[tuple[int, str], tuple[int, str]] = {}
    for adapter_id, adapter_ranks in zip(ids, ranks):
        for key, rank in adapter_ranks.items():
            seen = union.setdefault(key, (rank, adapter_id))
            if seen[0] != rank:
                layer, module = key
                raise MergeSpecInvalid(
                    "ids",
                    f"adapters {seen[1]!r} and {adapter_id!r} have ranks {seen[0]} and {rank} on "
                    f"layer {layer} {module}: only adapters of the same rank can be merged",
                )
    if not union:
        raise MergeSpecInvalid("ids", "the adapters adapt no projection")
    return {key: rank for key, (rank, _) in union.items()}


def check_mergeable(adapter_id: str, modules: Sequence[tuple[int, str]], dora: bool) -> None:
    """Merges (and export's fold) take plain LoRA on decoder-layer projections: a DoRA
    magnitude or an embedding / lm_head adapter (layer < 0) has no entry-wise merge here."""
    if dora:
        raise MergeSpecInvalid("ids", f"adapter {adapter_id!r} is a DoRA adapter: only LoRA adapters can be merged")
    outer = sorted({module for layer, module in modules if layer < 0})
    if outer:
        raise MergeSpecInvalid("ids", f"adapter {adapter_id!r} adapts {outer}: only decoder-layer projections "
                                      "can be merged")


def is_dora(adapter: LoraAdapter) -> bool:
    return any(getattr(w, "magnitude", None) is not None for w in adapter.modules.values())


def merge_adapters(
    adapter_id: str,
    spec: MergeSpec,
    sources: Sequence[LoraAdapter],  # in spec.ids order, any float dtype
    dtype: torch.dtype = torch.float32,
) -> LoraAdapter:
    """The derived adapter, computed in float32, returned in `dtype` (scalings 1)."""
    for source_id, source in zip(spec.ids, sources):
        check_mergeable(source_id, list(source.modules), is_dora(source))
    check_compatible(spec.ids, [{k: w.lora_a.shape[0] for k, w in s.modules.items()} for s in sources])
    keys = sorted({key for source in sources for key in source.modules})
    modules: dict[tuple[int, str], LoraModuleWeights] = {}
    for layer, module in keys:
        a_list, b_list, wa, wb = [], [], [], []
        for source, weight in zip(sources, spec.weights):
            part = source.modules.get((layer, module))
            if part is None:
                continue
            scaled = weight * part.scaling
            root = math.sqrt(abs(scaled))
            wa.append(math.copysign(root, scaled) if scaled != 0 else 0.0)  # the sign on A only
            wb.append(root)
            a_list.append(part.lora_a.float())
            b_list.append(part.lora_b.float())
        factors = []
        for factor, tensors, weights in (("A", a_list, wa), ("B", b_list, wb)):
            generator = None
            if spec.merge_strategy.startswith("dare"):
                generator = torch.Generator().manual_seed(projection_seed(spec, layer, module, factor))
            factors.append(merge_factor(tensors, torch.tensor(weights), spec, generator).to(dtype).contiguous())
        modules[(layer, module)] = LoraModuleWeights(factors[0], factors[1], 1.0)
    rank = max(w.lora_a.shape[0] for w in modules.values())
    names = tuple(dict.fromkeys(module for _, module in keys))
    config = LoraAdapterConfig(
        r=rank, lora_alpha=float(rank), use_rslora=False, target_modules=names, rank_pattern={},
        alpha_pattern={}, layers_to_transform=None, layers_pattern=None, base_model_name_or_path=None,
    )
    num_bytes = sum(w.lora_a.numel() * w.lora_a.element_size() + w.lora_b.numel() * w.lora_b.element_size()
                    for w in modules.values())
    return LoraAdapter(adapter_id, config, MappingProxyType(modules), rank, num_bytes)
