"""`Client` (blocking) and `AsyncClient` (asyncio) for a loramux server.

Both only send what `clients.operations` builds and hand the answer back to it; each public
method is one line per client. Streams are generators: iterate them to the end, or close
them, to free the connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx

from loramux.clients import operations as ops
from loramux.clients.operations import Call, StreamCall, connection_error
from loramux.clients.types import AdapterInfo, ChatDelta, ChatResult, GenerateResult, ModelInfo, StreamEvent

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8000"
# Generous read timeout: a long generation answers only at its end.
DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
USER_AGENT = "loramux-client/0.1.0"


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


class _Base:
    base_url: str

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"


class Client(_Base):
    """Blocking client. `with Client(url, api_key=...) as c: c.generate("Hi", adapter_id="a")`."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,  # e.g. httpx.MockTransport in tests
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=_headers(api_key), timeout=timeout,
                                  transport=transport)

    # -- transport

    def _call(self, call: Call[T]) -> T:
        try:
            with call.content() as content:
                response = self._http.request(call.method, call.path, **content)
        except httpx.TransportError as exc:
            return call.on_error(connection_error(exc, self.base_url))
        return call.result(response)

    def _stream(self, call: StreamCall[T]) -> Iterator[T]:
        try:
            with self._http.stream(call.method, call.path, json=call.json) as response:
                if response.is_error:
                    response.read()
                reader = call.reader(response)
                for chunk in response.iter_text():
                    yield from reader.feed(chunk)
                yield from reader.close()
        except httpx.TransportError as exc:
            raise connection_error(exc, self.base_url) from None

    # -- generation

    def generate(self, prompt: str, adapter_id: str | None = None, **params: Any) -> GenerateResult:
        """POST /generate. `params` are TGI's: max_new_tokens, temperature, top_p, stop, seed, ..."""
        return self._call(ops.generate(prompt, adapter_id, params))

    def generate_stream(self, prompt: str, adapter_id: str | None = None, **params: Any) -> Iterator[StreamEvent]:
        """POST /generate_stream: one event per token; the last has `.result` (text and details)."""
        return self._stream(ops.generate_stream(prompt, adapter_id, params))

    def chat(
        self, messages: str | list[dict], model: str | None = None, stream: bool = False, **params: Any
    ) -> ChatResult | Iterator[ChatDelta]:
        """POST /v1/chat/completions; `model` is an adapter id (None: the base model).

        A str is one user message. With stream=True: an iterator of text deltas, the last
        ones carrying finish_reason and usage.
        """
        if stream:
            return self._stream(ops.chat_stream(messages, model, params))
        return self._call(ops.chat(messages, model, params))

    def models(self) -> tuple[ModelInfo, ...]:
        return self._call(ops.models())

    def health(self) -> bool:
        return self._call(ops.health())

    # -- adapters (need an admin key when the server has keys)

    def list_adapters(self) -> tuple[AdapterInfo, ...]:
        return self._call(ops.list_adapters())

    def get_adapter(self, adapter_id: str) -> AdapterInfo:
        return self._call(ops.get_adapter(adapter_id))

    def upload_adapter(self, adapter_id: str, path: str | Path) -> AdapterInfo:
        """`path`: a directory holding adapter_config.json + adapter_model.safetensors, or a .zip/.tar.gz."""
        return self._call(ops.upload_adapter(adapter_id, path))

    def delete_adapter(self, adapter_id: str) -> None:
        return self._call(ops.delete_adapter(adapter_id))

    def pin_adapter(self, adapter_id: str) -> AdapterInfo:
        return self._call(ops.pin_adapter(adapter_id))

    def unpin_adapter(self, adapter_id: str) -> AdapterInfo:
        return self._call(ops.unpin_adapter(adapter_id))

    # -- lifetime

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client: the same methods as `Client`, awaited; streams are async iterators.

    `async for event in client.generate_stream(...)`; `async for delta in await client.chat(..., stream=True)`.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=_headers(api_key), timeout=timeout,
                                       transport=transport)

    # -- transport

    async def _call(self, call: Call[T]) -> T:
        try:
            with call.content() as content:
                response = await self._http.request(call.method, call.path, **content)
        except httpx.TransportError as exc:
            return call.on_error(connection_error(exc, self.base_url))
        return call.result(response)

    async def _stream(self, call: StreamCall[T]) -> AsyncIterator[T]:
        try:
            async with self._http.stream(call.method, call.path, json=call.json) as response:
                if response.is_error:
                    await response.aread()
                reader = call.reader(response)
                async for chunk in response.aiter_text():
                    for item in reader.feed(chunk):
                        yield item
                for item in reader.close():
                    yield item
        except httpx.TransportError as exc:
            raise connection_error(exc, self.base_url) from None

    # -- generation

    async def generate(self, prompt: str, adapter_id: str | None = None, **params: Any) -> GenerateResult:
        return await self._call(ops.generate(prompt, adapter_id, params))

    def generate_stream(self, prompt: str, adapter_id: str | None = None, **params: Any) -> AsyncIterator[StreamEvent]:
        return self._stream(ops.generate_stream(prompt, adapter_id, params))

    async def chat(
        self, messages: str | list[dict], model: str | None = None, stream: bool = False, **params: Any
    ) -> ChatResult | AsyncIterator[ChatDelta]:
        if stream:
            return self._stream(ops.chat_stream(messages, model, params))
        return await self._call(ops.chat(messages, model, params))

    async def models(self) -> tuple[ModelInfo, ...]:
        return await self._call(ops.models())

    async def health(self) -> bool:
        return await self._call(ops.health())

    # -- adapters

    async def list_adapters(self) -> tuple[AdapterInfo, ...]:
        return await self._call(ops.list_adapters())

    async def get_adapter(self, adapter_id: str) -> AdapterInfo:
        return await self._call(ops.get_adapter(adapter_id))

    async def upload_adapter(self, adapter_id: str, path: str | Path) -> AdapterInfo:
        return await self._call(ops.upload_adapter(adapter_id, path))

    async def delete_adapter(self, adapter_id: str) -> None:
        return await self._call(ops.delete_adapter(adapter_id))

    async def pin_adapter(self, adapter_id: str) -> AdapterInfo:
        return await self._call(ops.pin_adapter(adapter_id))

    async def unpin_adapter(self, adapter_id: str) -> AdapterInfo:
        return await self._call(ops.unpin_adapter(adapter_id))

    # -- lifetime

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
