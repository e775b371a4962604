"""Adapter management: upload, list, inspect, delete, pin; vLLM's load/unload endpoints.

Every route needs an admin key when API keys are configured. Uploads are validated against
the base model before they are accepted (the store stages, validates, then renames).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import UploadFile

from loramux.adapter_store.errors import (
    AdapterError,
    AdapterNotFound,
    InvalidAdapterId,
    PinLimitExceeded,
    UploadsDisabled,
    UploadTooLarge,
)
from loramux.adapter_store.store import AdapterInfo
from loramux.kernels.openmp import set_thread_openmp_threads
from loramux.server.api.archives import CONFIG_NAME, WEIGHTS_NAME, ArchiveError, extract_adapter_files
from loramux.server.api.auth import check_admin_key
from loramux.server.api.context import get_service
from loramux.server.api.openai import openai_error_response
from loramux.server.service import GenerationService, InvalidRequest, ServiceError, UnknownAdapter

router = APIRouter(prefix="/v1", dependencies=[Depends(check_admin_key)])

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


class UploadRejected(ServiceError):
    """The adapter does not fit (422), or the request is malformed."""

    kind = "validation"

    def __init__(self, message: str, param: str | None = None, status: int = 422) -> None:
        super().__init__(message, param)
        self.status = status


def info_json(info: AdapterInfo) -> dict:
    return {
        "id": info.adapter_id,
        "object": "adapter",
        "version": info.version,
        "status": str(info.status),
        "tier": info.tier,
        "rank": info.rank,
        "target_modules": list(info.target_modules),
        "bytes": info.num_bytes,
        "disk_bytes": info.disk_bytes,
        "pinned": info.pinned,
        "running_requests": info.num_leases,
        "source": info.source,
        "error": info.error,
        "error_type": info.error_type,
    }


def _error(exc: Exception):
    """Map the store's typed errors to HTTP answers in the OpenAI error shape."""
    if isinstance(exc, UploadRejected):
        return openai_error_response(exc, exc.status)
    if isinstance(exc, InvalidAdapterId):
        return openai_error_response(InvalidRequest(str(exc), "adapter_id"))
    if isinstance(exc, AdapterNotFound) and exc.path is None:
        return openai_error_response(UnknownAdapter(str(exc), "adapter_id"))
    if isinstance(exc, UploadTooLarge):
        return openai_error_response(InvalidRequest(str(exc), "file"), 413)
    if isinstance(exc, UploadsDisabled):
        return openai_error_response(InvalidRequest(str(exc)), 403)
    if isinstance(exc, PinLimitExceeded):
        return openai_error_response(InvalidRequest(str(exc), "adapter_id"), 409)
    if isinstance(exc, AdapterError):  # invalid, unsupported, too large a rank: does not fit
        return openai_error_response(InvalidRequest(str(exc), "file"), 422)
    raise exc


async def _read_upload(file: UploadFile, budget: int, max_bytes: int) -> bytes:
    """Read at most what is left of the budget; the message names the configured limit."""
    data = await file.read(budget + 1)
    if len(data) > budget:
        raise UploadRejected(f"the upload exceeds the limit of {max_bytes} bytes", "file", status=413)
    return data


async def _upload_files(request: Request, max_bytes: int) -> tuple[str, bytes, bytes]:
    try:
        form = await request.form(max_files=8, max_fields=16)
    except Exception as exc:  # noqa: BLE001 - malformed multipart
        raise UploadRejected(f"expected a multipart/form-data upload: {exc}", status=400) from None
    adapter_id = form.get("adapter_id") or form.get("id")
    if not isinstance(adapter_id, str) or not adapter_id:
        raise UploadRejected("the form needs an `adapter_id` field", "adapter_id", status=400)
    files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]  # values(): one per key
    if not files:
        raise UploadRejected(
            f"attach {CONFIG_NAME} and {WEIGHTS_NAME}, or one .zip/.tar(.gz) holding them", "file", status=400
        )
    by_name: dict[str, bytes] = {}
    budget = max_bytes
    for file in files:
        name = Path(file.filename or "").name
        data = await _read_upload(file, budget, max_bytes)
        budget -= len(data)
        if name.endswith(ARCHIVE_SUFFIXES) and len(files) == 1:
            try:
                config, weights = extract_adapter_files(data, max_bytes)
            except ArchiveError as exc:
                raise UploadRejected(str(exc), "file", status=400) from None
            return adapter_id, config, weights
        if name not in (CONFIG_NAME, WEIGHTS_NAME):
            raise UploadRejected(
                f"unexpected file {name!r}: send {CONFIG_NAME} and {WEIGHTS_NAME} (never pickled *.bin), "
                "or one archive holding them",
                "file",
                status=400,
            )
        by_name[name] = data
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if n not in by_name]
    if missing:
        raise UploadRejected(f"the upload lacks {', '.join(missing)}", "file", status=400)
    return adapter_id, by_name[CONFIG_NAME], by_name[WEIGHTS_NAME]


async def _run_blocking(function, *args):
    """Run blocking store work (file IO, validation) on a worker thread, off the event loop.
    The worker keeps to one OpenMP/MKL thread: a second wide pool in the process would slow
    every engine step (kernels/openmp.py)."""

    def call():
        set_thread_openmp_threads(1)
        return function(*args)

    return await run_in_threadpool(call)


@router.post("/adapters", status_code=201)
async def upload_adapter(request: Request, service: GenerationService = Depends(get_service)):
    store = service.parts.store
    try:
        adapter_id, config, weights = await _upload_files(request, store.config.max_upload_bytes)
        info = await _run_blocking(store.upload, adapter_id, config, weights)
    except (UploadRejected, AdapterError) as exc:
        return _error(exc)
    return info_json(info)


@router.get("/adapters")
async def list_adapters(service: GenerationService = Depends(get_service)):
    infos = await _run_blocking(service.parts.store.list)
    return {"object": "list", "data": [info_json(i) for i in infos]}


@router.get("/adapters/{adapter_id}")
async def get_adapter(adapter_id: str, service: GenerationService = Depends(get_service)):
    try:
        return info_json(service.parts.store.info(adapter_id))
    except AdapterError as exc:
        return _error(exc)


@router.delete("/adapters/{adapter_id}")
async def delete_adapter(adapter_id: str, service: GenerationService = Depends(get_service)):
    try:
        await _run_blocking(service.parts.store.delete, adapter_id)
    except AdapterError as exc:
        return _error(exc)
    return {"id": adapter_id, "object": "adapter", "deleted": True}


@router.post("/adapters/{adapter_id}/pin")
async def pin_adapter(adapter_id: str, service: GenerationService = Depends(get_service)):
    store = service.parts.store
    try:
        store.pin_permanent(adapter_id)
        return info_json(store.info(adapter_id))
    except AdapterError as exc:
        return _error(exc)


@router.post("/adapters/{adapter_id}/unpin")
async def unpin_adapter(adapter_id: str, service: GenerationService = Depends(get_service)):
    store = service.parts.store
    try:
        store.unpin_permanent(adapter_id)
        return info_json(store.info(adapter_id))
    except AdapterError as exc:
        return _error(exc)


# --------------------------------------------------------------------------- vLLM's endpoints


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str


def _inside_adapter_dirs(path: str, roots: tuple[Path, ...]) -> Path:
    """A path the admin named, accepted only inside a configured adapter directory."""
    resolved = Path(path).resolve()
    for root in roots:
        if resolved.is_relative_to(root.resolve()) and resolved != root.resolve():
            return resolved
    raise UploadRejected(
        "lora_path must lie inside one of the server's --adapter-dir directories", "lora_path", status=400
    )


@router.post("/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraAdapterRequest, service: GenerationService = Depends(get_service)):
    store = service.parts.store
    try:
        path = _inside_adapter_dirs(body.lora_path, store.config.adapter_dirs)
        try:
            store.info(body.lora_name)
            exists = True
        except AdapterNotFound:
            exists = False
        if exists and not body.load_inplace:
            raise UploadRejected(
                f"The lora adapter '{body.lora_name}' has already been loaded (set load_inplace to replace it).",
                "lora_name", status=400,
            )
        await _run_blocking(store.register_directory, body.lora_name, path)
    except (UploadRejected, AdapterError) as exc:
        return _error(exc)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, service: GenerationService = Depends(get_service)):
    try:
        await _run_blocking(service.parts.store.delete, body.lora_name)
    except AdapterError as exc:
        return _error(exc)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

