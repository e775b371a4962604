"""Adapter management: upload, list, inspect, delete, pin; vLLM's load/unload endpoints.

Every route needs an admin key when API keys are configured. Uploads are validated against
the base model before they are accepted (the store stages, validates, then renames).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from loramux.adapter_store.errors import (
    AdapterIdConflict,
    AdapterError,
    AdapterNotFound,
    InvalidAdapterId,
    PinLimitExceeded,
    UploadsDisabled,
    UploadTooLarge,
    encodable_text,
)
from loramux.adapter_store.store import AdapterInfo
from loramux.kernels.openmp import set_thread_openmp_threads
from loramux.server.api.archives import (
    CONFIG_NAME,
    PICKLED_WEIGHTS_NAME,
    WEIGHTS_NAME,
    ArchiveError,
    archive_format,
    extract_adapter_files,
)
from loramux.server.api.auth import check_admin_key
from loramux.server.api.context import ClientDisconnected, get_service
from loramux.server.api.openai import openai_error_response
from loramux.server.service import GenerationService, InvalidRequest, ServiceError, UnknownAdapter

router = APIRouter(prefix="/v1", dependencies=[Depends(check_admin_key)])


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
    """Map the store's typed errors to HTTP answers in the OpenAI error shape; messages
    name the user's file, never a path on this server."""
    if isinstance(exc, UploadRejected):
        exc.message = encodable_text(exc.message)  # may quote an archive's member names
        response = openai_error_response(exc, exc.status)
        if exc.status == 429:
            response.headers["Retry-After"] = "1"
        return response
    if not isinstance(exc, AdapterError):
        raise exc
    message = exc.public_message()
    if isinstance(exc, InvalidAdapterId):
        return openai_error_response(InvalidRequest(message, "adapter_id"))
    if isinstance(exc, AdapterNotFound) and exc.path is None:
        return openai_error_response(UnknownAdapter(message, "adapter_id"))
    if isinstance(exc, UploadTooLarge):
        return openai_error_response(InvalidRequest(message, "file"), 413)
    if isinstance(exc, UploadsDisabled):
        return openai_error_response(InvalidRequest(message), 403)
    if isinstance(exc, AdapterIdConflict):
        return openai_error_response(InvalidRequest(message, "adapter_id"), 409)
    if isinstance(exc, PinLimitExceeded):
        return openai_error_response(InvalidRequest(message, "adapter_id"), 409)
    # invalid, unsupported, too large a rank: does not fit
    return openai_error_response(InvalidRequest(message, "file"), 422)


# --------------------------------------------------------------------------- uploads

# Multipart framing (boundaries, part headers, the adapter_id field) on top of the files.
_FORM_OVERHEAD = 64 << 10
# A peft folder has a dozen files (adapter files, README.md, tokenizer files, ...).
_MAX_FORM_FILES = 64
_MAX_FORM_FIELDS = 16
# Shown in the reply's `ignored_files`; more are counted, not named; long names are cut.
_MAX_NAMED_IGNORED = 100
_MAX_NAME_CHARS = 256


@dataclass(frozen=True)
class _Upload:
    adapter_id: str
    config: bytes
    weights: bytes
    ignored: tuple[str, ...]  # files (or archive members) that were not read


class _UploadGate:
    """At most `limit` uploads at once; one more is answered 429 at once, not queued. Used
    from the event loop only, so a plain counter is enough."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    @contextmanager
    def slot(self):
        if self.active >= self.limit:
            raise UploadRejected(
                f"{self.active} adapter uploads are in progress, the most this server takes at "
                "once; retry shortly",
                status=429,
            )
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


def _upload_gate(request: Request, limit: int) -> _UploadGate:
    gate = getattr(request.app.state, "upload_gate", None)
    if gate is None:
        gate = request.app.state.upload_gate = _UploadGate(limit)
    return gate


def _check_content_length(request: Request, max_bytes: int) -> None:
    """Refuse a declared body over the limit before a byte of it is read or spooled."""
    declared = request.headers.get("content-length")
    if declared is None:
        return  # chunked: _bounded_body stops it at the limit instead
    if not declared.isdigit():
        raise UploadRejected("Content-Length must be a whole number of bytes", status=400)
    if int(declared) > max_bytes + _FORM_OVERHEAD:
        raise UploadRejected(
            f"the upload is {int(declared)} bytes, more than the limit of {max_bytes} bytes",
            "file",
            status=413,
        )


async def _bounded_body(request: Request, max_bytes: int) -> AsyncIterator[bytes]:
    """The request body, refused once it passes the limit (a missing or lying Content-Length)."""
    limit = max_bytes + _FORM_OVERHEAD
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise UploadRejected(
                f"the upload exceeds the limit of {max_bytes} bytes", "file", status=413
            )
        yield chunk


async def _parse_form(request: Request, max_bytes: int) -> FormData:
    content_type, _ = parse_options_header(request.headers.get("content-type", ""))
    body = _bounded_body(request, max_bytes)
    if content_type == b"multipart/form-data":
        parser = MultiPartParser(
            request.headers, body, max_files=_MAX_FORM_FILES, max_fields=_MAX_FORM_FIELDS
        )
    elif content_type == b"application/x-www-form-urlencoded":  # fields only: says what is missing
        parser = FormParser(request.headers, body)
    else:
        raise UploadRejected(
            "expected a multipart/form-data upload (an adapter_id field and the adapter's files)",
            status=400,
        )
    try:
        return await parser.parse()  # closes what it spooled if it fails
    except MultiPartException as exc:
        raise UploadRejected(f"malformed multipart/form-data upload: {exc.message}", status=400) from None
    finally:
        await body.aclose()


async def _read_upload(file: UploadFile, budget: int, max_bytes: int) -> bytes:
    """Read at most what is left of the budget; the message names the configured limit."""
    data = await file.read(budget + 1)
    if len(data) > budget:
        raise UploadRejected(f"the upload exceeds the limit of {max_bytes} bytes", "file", status=413)
    return data


def _size(file: UploadFile) -> int:
    return file.size if file.size is not None else 0


async def _upload_from_form(form: FormData, max_bytes: int) -> _Upload:
    adapter_id = form.get("adapter_id") or form.get("id")
    if not isinstance(adapter_id, str) or not adapter_id:
        raise UploadRejected("the form needs an `adapter_id` field", "adapter_id", status=400)
    files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
    if not files:
        raise UploadRejected(
            f"attach {CONFIG_NAME} and {WEIGHTS_NAME} (a folder as peft's save_pretrained writes it), "
            "or one .zip/.tar.gz holding them",
            "file",
            status=400,
        )
    if len(files) == 1:
        name = files[0].filename or ""
        kind = _archive_format(name)
        if kind is not None:
            if _size(files[0]) > max_bytes:
                raise UploadRejected(f"the upload exceeds the limit of {max_bytes} bytes", "file", status=413)
            # Inflating is CPU work: off the event loop, on the spooled file itself.
            try:
                found = await _run_blocking(extract_adapter_files, files[0].file, kind, max_bytes)
            except ArchiveError as exc:
                raise UploadRejected(str(exc), "file", status=400) from None
            return _Upload(adapter_id, found.config, found.weights, found.ignored)

    by_name: dict[str, UploadFile] = {}
    ignored: list[str] = []
    for file in files:
        name = PurePosixPath((file.filename or "").replace("\\", "/")).name
        if name in (CONFIG_NAME, WEIGHTS_NAME):
            if name in by_name:
                raise UploadRejected(f"the upload holds {name} more than once", "file", status=400)
            by_name[name] = file
        else:
            _archive_format(name)  # an archive among other files: refuse other formats by name
            ignored.append(name or "(unnamed)")
    if WEIGHTS_NAME not in by_name and PICKLED_WEIGHTS_NAME in ignored:
        raise UploadRejected(
            f"{PICKLED_WEIGHTS_NAME} holds pickled weights, which are never loaded; send "
            f"{WEIGHTS_NAME} (peft's save_pretrained writes it by default)",
            "file",
            status=400,
        )
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if n not in by_name]
    if missing:
        raise UploadRejected(f"the upload lacks {', '.join(missing)}", "file", status=400)
    budget = max_bytes
    data: dict[str, bytes] = {}
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        data[name] = await _read_upload(by_name[name], budget, max_bytes)
        budget -= len(data[name])
    return _Upload(adapter_id, data[CONFIG_NAME], data[WEIGHTS_NAME], tuple(ignored))


def _archive_format(name: str) -> str | None:
    try:
        return archive_format(name)
    except ArchiveError as exc:
        raise UploadRejected(str(exc), "file", status=400) from None


async def _run_blocking(function, *args):
    """Run blocking store work (file IO, validation) on a worker thread, off the event loop.
    The worker keeps to one OpenMP/MKL thread: a second wide pool in the process would slow
    every engine step (loramux_kernels/openmp.py)."""

    def call():
        set_thread_openmp_threads(1)
        return function(*args)

    return await run_in_threadpool(call)


@router.post("/adapters", status_code=201)
async def upload_adapter(request: Request, service: GenerationService = Depends(get_service)):
    """Multipart form: `adapter_id` and either the adapter's files (a folder as peft's
    save_pretrained writes it; files other than the two adapter files are ignored and
    named in `ignored_files`) or one .zip / .tar.gz archive of such a folder."""
    store = service.parts.store
    max_bytes = store.config.max_upload_bytes
    try:
        _check_content_length(request, max_bytes)
        with _upload_gate(request, store.config.max_concurrent_uploads).slot():
            form = await _parse_form(request, max_bytes)
            try:
                upload = await _upload_from_form(form, max_bytes)
            finally:
                await form.close()
            info = await _run_blocking(store.upload, upload.adapter_id, upload.config, upload.weights)
    except (UploadRejected, AdapterError) as exc:
        return _error(exc)
    except ClientDisconnect:  # gone mid-body: the form is closed, the slot released
        raise ClientDisconnected() from None
    reply = info_json(info)
    named = upload.ignored[:_MAX_NAMED_IGNORED]
    reply["ignored_files"] = [encodable_text(name[:_MAX_NAME_CHARS]) for name in named]
    if len(upload.ignored) > _MAX_NAMED_IGNORED:
        reply["num_ignored_files"] = len(upload.ignored)
    return reply


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
    try:
        resolved = Path(path).resolve()
    except (ValueError, OSError, RuntimeError) as exc:  # a NUL byte, a name too long, a link loop
        reason = f"lora_path is not a usable path: {type(exc).__name__}"
        raise UploadRejected(reason, "lora_path", status=400) from None
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

