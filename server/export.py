"""`loramux export ADAPTER_ID|MERGE_SPEC --out DIR`: a standalone Hugging Face checkpoint
with an adapter (or a merge of adapters) folded into the base weights.

    W' = W + scaling * lora_B @ lora_A        per adapted projection, in float32

The base is loaded in float32 whatever its dtype and the serving dtype: folding into
bf16-rounded weights would lose the adapter's small deltas (a delta below half a bf16 ulp
of W vanishes). The sum is rounded once, to the base checkpoint's dtype or `--dtype`.
Packed projections (Phi-3's qkv_proj) take each part's delta in its rows. The result
is written with transformers' save_pretrained, with the base's tokenizer files.

The target is an adapter id (looked up in --adapter-dir folders, then the upload
directory's newest version), a path to a PEFT adapter directory, or a merge spec as JSON
(`{"ids": [...], "weights": [...], "merge_strategy": "ties", ...}`, or @file.json) with
the semantics of the `merged_adapters` request field (adapter_store/merge.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loramux.adapter_store.format import CONFIG_NAME, BaseModelSpec, LoraAdapter, load_adapter
from loramux.adapter_store.ids import check_adapter_id
from loramux.adapter_store.merge import MergeSpec, MergeSpecInvalid, check_mergeable, is_dora, merge_adapters
from loramux.adapter_store.value_limits import MAX_RANK_VALUE
from loramux.server.config import DTYPES


class ExportError(Exception):
    """The target or the base cannot be exported; the message says why."""


def find_adapter(target: str, adapter_dirs: list[Path], upload_dir: Path | None) -> tuple[str, Path]:
    """(id, directory) of an adapter named by id (adapter dirs first, then uploads) or by path."""
    path = Path(target)
    if (path / CONFIG_NAME).is_file():
        return path.name, path
    check_adapter_id(target)
    for root in adapter_dirs:
        if (root / target / CONFIG_NAME).is_file():
            return target, root / target
    if upload_dir is not None and (upload_dir / target).is_dir():
        versions = sorted(int(p.name) for p in (upload_dir / target).iterdir() if p.name.isdigit())
        if versions:
            return target, upload_dir / target / str(versions[-1])
    raise ExportError(f"adapter {target!r} is not in {[str(d) for d in adapter_dirs]} nor in the upload dir {upload_dir}")


def parse_target(target: str) -> dict | None:
    """The merge spec's JSON object when the target is one, else None (an adapter)."""
    text = Path(target[1:]).read_text() if target.startswith("@") else target
    if not text.lstrip().startswith("{"):
        return None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ExportError(f"the merge spec is not valid JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise ExportError("the merge spec must be a JSON object")
    return spec


def build_adapter(target: str, spec: BaseModelSpec, adapter_dirs: list[Path], upload_dir: Path | None) -> LoraAdapter:
    """The adapter to fold, in float32: one adapter, or the merge the spec describes."""
    raw = parse_target(target)
    if raw is None:
        adapter_id, directory = find_adapter(target, adapter_dirs, upload_dir)
        return load_adapter(adapter_id, directory, spec, MAX_RANK_VALUE, torch.float32)
    unknown = set(raw) - {"ids", "weights", "merge_strategy", "density", "majority_sign_method"}
    if unknown:
        raise ExportError(f"unknown merge spec fields {sorted(unknown)}")
    try:
        merge = MergeSpec.create(raw.get("ids"), raw.get("weights"), raw.get("merge_strategy") or "linear",
                                 raw.get("density", 1.0), raw.get("majority_sign_method") or "total",
                                 max_ids=len(raw.get("ids") or ()) or 1)
    except MergeSpecInvalid as exc:
        raise ExportError(f"merge spec field {exc.field}: {exc.message}") from None
    sources = [load_adapter(i, d, spec, MAX_RANK_VALUE, torch.float32)
               for i, d in (find_adapter(i, adapter_dirs, upload_dir) for i in merge.ids)]
    try:
        return merge_adapters("merged", merge, sources, torch.float32)
    except MergeSpecInvalid as exc:
        raise ExportError(f"merge spec field {exc.field}: {exc.message}") from None


def fold_adapter(model: torch.nn.Module, spec: BaseModelSpec, adapter: LoraAdapter) -> int:
    """Add every projection's delta to the (float32) model's weights; returns how many.
    Plain LoRA on decoder-layer projections only (DoRA and embedding adapters are refused)."""
    try:
        check_mergeable(adapter.adapter_id, list(adapter.modules), is_dora(adapter))
    except MergeSpecInvalid as exc:
        raise ExportError(exc.message.replace("can be merged", "can be exported")) from None
    modules = dict(model.named_modules())
    packed_of = {part: packed for packed, parts in spec.packed_modules.items() for part in parts}
    with torch.no_grad():
        for (layer, module), w in adapter.modules.items():
            delta = w.scaling * (w.lora_b.float() @ w.lora_a.float())  # [out_features, in_features]
            linear = modules.get(spec.module_name(layer, module))
            if linear is not None:
                linear.weight += delta
                continue
            packed = packed_of.get(module)
            linear = modules.get(spec.module_name(layer, packed)) if packed else None
            if linear is None:
                raise ExportError(f"the base model has no module for layer {layer} {module}")
            linear.weight[spec.part_rows(packed, module)] += delta
    return len(adapter.modules)


def base_dtype(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return name if name in DTYPES else "float32"


def export(target: str, out: Path, model_dir: Path, adapter_dirs: list[Path], upload_dir: Path | None,
           dtype: str | None = None) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loramux.server.models.registry import adapter_spec_for

    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    spec = adapter_spec_for(model.config)
    adapter = build_adapter(target, spec, adapter_dirs, upload_dir)
    fold_adapter(model, spec, adapter)
    saved = dtype or base_dtype(model_dir)
    model.to(DTYPES[saved]).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(out))
    return out
