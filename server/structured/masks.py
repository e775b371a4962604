"""The runner's grammar masks: one bitmask per step over the constrained rows.

`apply(logits, requests)` masks the rows whose request carries a compiled grammar
(SamplingParams.grammar) and leaves the others untouched, so constrained and free requests
of any adapters share the batch. `accept(requests, tokens)` hands the step's sampled
tokens to a worker thread that advances each matcher and computes its next mask while the
engine updates the scheduler and runs the next forward; the next `apply` only waits for
what is not done yet. A matcher is made the first time its request samples and dropped
once the request has finished.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import xgrammar

from loramux.scheduler.request import Request


class _Matcher:
    """One request's grammar state; touched by one thread at a time (the worker's job is
    awaited before the engine thread reads it)."""

    def __init__(self, compiled: xgrammar.CompiledGrammar) -> None:
        self.matcher = xgrammar.GrammarMatcher(compiled)
        self.num_accepted = 0  # output tokens fed to the matcher
        self.next_mask: torch.Tensor | None = None  # int32 [words], for output length num_accepted
        self.job: Future | None = None  # the worker's advance, when one is pending

    def catch_up(self, output_token_ids: list[int], words: int) -> torch.Tensor | None:
        """The mask for the next token after `output_token_ids` (None: leave the row free)."""
        self.wait()
        if self.num_accepted > len(output_token_ids):  # never expected; keep the matcher true
            self.matcher.rollback(self.num_accepted - len(output_token_ids))
            self.num_accepted, self.next_mask = len(output_token_ids), None
        if self.num_accepted < len(output_token_ids):
            for token in output_token_ids[self.num_accepted:]:
                self.matcher.accept_token(token)
            self.num_accepted, self.next_mask = len(output_token_ids), None
        if self.next_mask is None:
            self.fill(words)
        return self.next_mask

    def wait(self) -> float:
        """Wait for the worker's pending advance; returns the seconds waited."""
        if self.job is None:
            return 0.0
        started = time.perf_counter()
        self.job.result()
        self.job = None
        return time.perf_counter() - started

    def advance(self, token: int, words: int) -> None:
        self.matcher.accept_token(token)
        self.num_accepted += 1
        self.fill(words)

    def fill(self, words: int) -> None:
        if self.matcher.is_terminated():  # past the end (ignore_eos): nothing left to constrain
            self.next_mask = None
            return
        mask = torch.empty((1, words), dtype=torch.int32)
        self.matcher.fill_next_token_bitmask(mask, 0)
        self.next_mask = mask[0]


@dataclass
class MaskStats:
    num_tokens: int = 0  # constrained rows sampled
    worker_seconds: float = 0.0  # accept + next mask, in the worker (overlapped with the forward)
    critical_seconds: float = 0.0  # time apply() adds to the step (waits, catch-up, the masking)
    wait_seconds: float = 0.0  # the part of critical_seconds spent waiting for the worker

    @property
    def us_per_token(self) -> float:
        """All grammar work (in the worker or not; waits not counted twice) per constrained token."""
        work = self.worker_seconds + self.critical_seconds - self.wait_seconds
        return 1e6 * work / max(1, self.num_tokens)


class GrammarMasks:
    def __init__(self) -> None:
        self._matchers: dict[str, tuple[Request, _Matcher]] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="loramux-grammar-mask")
        self._stats_lock = threading.Lock()
        self.stats = MaskStats()

    def apply(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """logits: fp32 [n, vocab], row i = requests[i]; constrained rows masked in place."""
        self._drop_finished()
        rows = [i for i, r in enumerate(requests) if r.sampling_params.grammar is not None]
        if not rows:
            return logits
        started = time.perf_counter()
        words = xgrammar.get_bitmask_shape(1, logits.shape[-1])[1]
        bitmask = torch.full((len(requests), words), -1, dtype=torch.int32)  # [n, words], all allowed
        masked, waited = [], 0.0
        for i in rows:
            matcher = self._matcher(requests[i])
            waited += matcher.wait()
            mask = matcher.catch_up(requests[i].output_token_ids, words)
            if mask is not None:
                bitmask[i] = mask
                masked.append(i)
        if masked:
            xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                                 indices=masked)
        with self._stats_lock:
            self.stats.num_tokens += len(rows)
            self.stats.critical_seconds += time.perf_counter() - started
            self.stats.wait_seconds += waited
        return logits

    def accept(self, requests: Sequence[Request], tokens: Sequence[int], vocab_size: int) -> None:
        """The step's sampled tokens: advance the constrained requests' matchers and compute
        their next masks on the worker thread."""
        work = [
            (self._matchers[r.request_id][1], t)
            for r, t in zip(requests, tokens)
            if r.sampling_params.grammar is not None and r.request_id in self._matchers
        ]
        if not work:
            return
        words = xgrammar.get_bitmask_shape(1, vocab_size)[1]
        job = self._pool.submit(self._advance_all, work, words)
        for matcher, _ in work:
            matcher.job = job

    def _advance_all(self, work: list[tuple[_Matcher, int]], words: int) -> None:
        started = time.perf_counter()
        for matcher, token in work:
            matcher.advance(token, words)
        with self._stats_lock:
            self.stats.worker_seconds += time.perf_counter() - started

    def _matcher(self, request: Request) -> _Matcher:
        entry = self._matchers.get(request.request_id)
        if entry is None or entry[0] is not request:  # a new request (ids are unique while running)
            entry = (request, _Matcher(request.sampling_params.grammar))
            self._matchers[request.request_id] = entry
        return entry[1]

    def _drop_finished(self) -> None:
        if self._matchers:
            for request_id in [k for k, (r, _) in self._matchers.items() if r.is_finished]:
                del self._matchers[request_id]

    @property
    def num_active(self) -> int:
        return len(self._matchers)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
