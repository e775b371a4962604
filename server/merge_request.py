"""The `merged_adapters` request field (LoRAX /generate parameters; an extra body field on
the OpenAI routes): parsed, checked, and resolved to the id of a derived adapter that the
engine serves like any other (adapter_store/merged.py).

    {"ids": ["a", "b"], "weights": [0.7, 0.3], "merge_strategy": "ties",
     "density": 0.5, "majority_sign_method": "total"}

Routes call `resolve_adapter_or_merge` only; errors are ServiceErrors naming the field
(`merged_adapters.<field>`): unknown sources 404, anything else wrong 4xx by route, and
429 when every derived-adapter place is held by running requests.
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, ConfigDict, ValidationError

from loramux.adapter_store.merge import MergeSpec, MergeSpecInvalid
from loramux.adapter_store.merged import MergeCapacity, MergeSourceNotFound
from loramux.server.service import GenerationService, InvalidRequest, Overloaded, UnknownAdapter

FIELD = "merged_adapters"


class MergedAdaptersField(BaseModel):
    """LoRAX's MergedAdapters; lorax-client sends null for the optional strings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    ids: list[str]
    weights: list[float] | None = None
    merge_strategy: str | None = None  # None: linear
    density: float = 1.0
    majority_sign_method: str | None = None  # None: total


def parse_merge_spec(raw: object, max_ids: int) -> MergeSpec:
    """The request's field as a checked MergeSpec; InvalidRequest naming the bad field."""
    try:
        field = MergedAdaptersField.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"] if not isinstance(p, int))
        param = f"{FIELD}.{where}" if where else FIELD
        raise InvalidRequest(f"{param}: {error['msg']}", param) from None
    try:
        return MergeSpec.create(
            field.ids, field.weights, (field.merge_strategy or "linear").lower(), field.density,
            (field.majority_sign_method or "total").lower(), max_ids=max_ids,
        )
    except MergeSpecInvalid as exc:
        raise InvalidRequest(f"{FIELD}.{exc.field}: {exc.message}", f"{FIELD}.{exc.field}") from None


async def resolve_adapter_or_merge(service: GenerationService, adapter: str | None, merged: object,
                                   adapter_param: str = "adapter_id") -> str | None:
    """The adapter a request runs with: `adapter` as named (service.resolve_adapter), or,
    when `merged` is given, the derived adapter of that merge (built once per spec)."""
    if merged is None:
        return service.resolve_adapter(adapter, adapter_param)
    if adapter not in (None, "", service.served_model_name):
        raise InvalidRequest(f"name either {adapter_param} or {FIELD}, not both", FIELD)
    store = service.parts.store
    spec = parse_merge_spec(merged, store.config.max_merge_ids)
    try:
        # a new spec reads its sources' configs: off the event loop
        return await asyncio.to_thread(store.merges.resolve, spec)
    except MergeSourceNotFound as exc:
        raise UnknownAdapter(f"{FIELD}.{exc.field}: {exc.message}", f"{FIELD}.{exc.field}") from None
    except MergeSpecInvalid as exc:
        raise InvalidRequest(f"{FIELD}.{exc.field}: {exc.message}", f"{FIELD}.{exc.field}") from None
    except MergeCapacity as exc:
        raise Overloaded(str(exc), FIELD) from None
