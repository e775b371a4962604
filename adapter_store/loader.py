"""The loader thread and the device copy: where adapter loads happen, off the engine thread.

The store's `_step` does one unit of loading work (read one adapter, or write it into a
slot); `LoaderThread` runs it until there is nothing to do, then sleeps until the store
wakes it (a prefetch, an unpin that may free a slot, a delete, close) or until a fresh
slot's grace period ends. `LoadFn` is the injectable read (format.load_adapter by default),
so a test can slow or fail a load.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import torch

from loramux.adapter_store.device_slots import write_adapter_to_slot
from loramux.adapter_store.format import BaseModelSpec, LoraAdapter
from loramux.kernels.buffers import LoraModuleBuffers
from loramux.kernels.openmp import set_thread_openmp_threads

log = logging.getLogger(__name__)


class LoadFn(Protocol):
    """format.load_adapter's signature: read, validate and convert one adapter directory."""

    def __call__(
        self,
        adapter_id: str,
        directory: str | Path,
        spec: BaseModelSpec,
        max_rank: int,
        dtype: torch.dtype = ...,
    ) -> LoraAdapter: ...


class SlotWriter:
    """Writes adapters into slots of the model's buffers, complete when `write` returns.

    On CUDA the copies run on a stream of their own, so they do not queue behind the
    engine's kernels, and the stream is synchronized before `write` returns: the store
    publishes a slot only after that, so no step can read a half-copied slot.
    """

    def __init__(
        self, buffers: Mapping[tuple[int, str], LoraModuleBuffers], device: torch.device
    ) -> None:
        self._buffers = buffers
        self._device = device
        self._stream: torch.cuda.Stream | None = None

    def write(self, slot: int, adapter: LoraAdapter) -> None:
        if self._device.type != "cuda":
            write_adapter_to_slot(self._buffers, slot, adapter)
            return
        if self._stream is None:  # created on the loader thread, on first use
            self._stream = torch.cuda.Stream(device=self._device)
        # The slot was unpinned after the step that read it was launched: wait for the
        # work queued so far, so a kernel still reading the slot never sees the new weights.
        self._stream.wait_stream(torch.cuda.default_stream(self._device))
        with torch.cuda.stream(self._stream):
            write_adapter_to_slot(self._buffers, slot, adapter)
        self._stream.synchronize()


class LoaderThread:
    """Runs `step` (True: it did some work) on a thread of its own until `stop`."""

    def __init__(
        self,
        step: Callable[[], bool],
        cond: threading.Condition,
        wake_count: Callable[[], int],
        idle_timeout: Callable[[], float | None],
    ) -> None:
        self._step = step
        self._cond = cond  # the store's lock; notified whenever there may be new work
        self._wake_count = wake_count  # bumped by every notify (read under the lock)
        self._idle_timeout = idle_timeout  # seconds to sleep at most (under the lock)
        self._stopping = False
        self._thread = threading.Thread(
            target=self._run, name="loramux-adapter-loader", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish the unit of work under way, then end the thread and join it."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        # One OpenMP thread: a second worker pool would throttle the engine's (loramux_kernels/openmp.py).
        set_thread_openmp_threads(1)
        while True:
            with self._cond:
                if self._stopping:
                    return
                seen = self._wake_count()
            try:
                if self._step():
                    continue
            except Exception:  # a bug in the store; keep serving the other adapters
                log.exception("adapter loader step failed")
            with self._cond:
                # A wake-up since `seen` means new work: do not sleep through it.
                self._cond.wait_for(
                    lambda: self._stopping or self._wake_count() != seen,
                    timeout=self._idle_timeout(),
                )
