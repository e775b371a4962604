"""The async engine: the step loop in its own thread, an async stream per request.

The asyncio loop (HTTP) never runs model code: it hands commands to the engine thread
through a queue, and the thread hands each step's outputs back with one
call_soon_threadsafe per step. A stream whose consumer goes away aborts its request,
which frees its KV blocks and adapter pin at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch

from loramux.kernels.openmp import set_thread_openmp_threads
from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.native_memory import HeapTrimmer
from loramux.server.engine_core import EngineCore
from loramux.server.outputs import RequestOutput

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.005  # how long an idle or stalled (adapter loading) loop sleeps between looks


class EngineDead(RuntimeError):
    """The engine thread stopped; no request can be served."""


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_id: str | None


@dataclass(frozen=True)
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, core: EngineCore, num_threads: int | None = None) -> None:
        self.core = core
        self._num_threads = num_threads
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}  # touched on the event loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._heap = HeapTrimmer()  # freed C heap back to the OS while idle
        # Called on the engine thread after each step, or after aborts that empty the engine
        # without one: (core, outputs, stepped).
        self.step_listeners: list[Callable[[EngineCore, list[RequestOutput], bool], None]] = []
        self.dead_error: BaseException | None = None
        # Called on the event loop once the thread has died and every open stream has
        # been failed: the server exits non-zero so that an orchestrator restarts it.
        self.on_death: Callable[[BaseException], None] | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="loramux-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ requests

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs; leaving the iteration early aborts the request."""
        if not self.is_alive:
            raise EngineDead("the engine is not running")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._send(_Add(request_id, list(prompt_token_ids), params, adapter_id))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._send(_Abort(request_id))

    def abort_all(self) -> int:
        """End every open request (finish_reason ABORT; each stream gets its final output).
        Returns how many were open. Call on the event loop."""
        for request_id in list(self._streams):
            self.abort(request_id)
        return len(self._streams)

    @property
    def num_open_streams(self) -> int:
        return len(self._streams)

    def _send(self, command: _Add | _Abort) -> None:
        self._commands.put(command)
        self._wakeup.set()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        # The one thread that runs wide OpenMP regions (see loramux_kernels/openmp.py).
        set_thread_openmp_threads(self._num_threads or torch.get_num_threads())
        try:
            while not self._stopping.is_set():
                outputs = self._drain_commands()
                stepped = self.core.has_unfinished_requests()
                if stepped:
                    outputs += self.core.step()
                    self._heap.stepped()
                if stepped or outputs:  # aborts that empty the engine take no step
                    for listener in self.step_listeners:
                        listener(self.core, outputs, stepped)
                if outputs:
                    self._deliver(outputs)
                elif not self._stopping.is_set():
                    if not self.core.has_unfinished_requests():
                        self._heap.idle()
                    self._wakeup.wait(IDLE_WAIT_S if self.core.has_unfinished_requests() else 1.0)
                    self._wakeup.clear()
        except BaseException as exc:  # noqa: BLE001 - report, then fail every open stream
            logger.exception("engine thread died")
            self.dead_error = exc
            self._fail_all(EngineDead(f"engine thread died: {type(exc).__name__}"))

    def _drain_commands(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return outputs
            if isinstance(command, _Abort):
                outputs += self.core.abort([command.request_id])
                continue
            try:
                self.core.add_request(
                    command.request_id, command.prompt_token_ids, command.params, command.adapter_id
                )
            except Exception as exc:  # noqa: BLE001 - a bad request fails alone
                self._deliver_error(command.request_id, exc)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _deliver_error(self, request_id: str, exc: BaseException) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._dispatch_error, request_id, exc)

    def _fail_all(self, exc: BaseException) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._dispatch_error_all, exc)

    # ------------------------------------------------------------------ on the event loop

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put_nowait(output)

    def _dispatch_error(self, request_id: str, exc: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(exc)

    def _dispatch_error_all(self, exc: BaseException) -> None:
        for stream in self._streams.values():
            stream.put_nowait(exc)
        if self.on_death is not None and self.dead_error is not None:
            self.on_death(self.dead_error)
