"""Iteration-level scheduler (vLLM v1 style): which requests run this step, how many tokens each.

There are no separate prefill and decode phases. Every request has `num_computed_tokens`
(tokens whose K/V are in the cache) and needs `num_tokens - num_computed_tokens` more: the
rest of its prompt (a prefill, maybe split over several steps) or 1 (a decode). One step:

1. `schedule()`
   a. running requests, oldest first, each take min(needed, budget left, chunk cap) tokens;
      when the KV cache is full the NEWEST running request is preempted (recompute later);
   b. if nothing was preempted, waiting requests are admitted in queue order while token
      budget, max_num_seqs and KV blocks last. A preempted request kept its slot lease, so
      it resumes on the adapter version it started with. A request whose adapter is not resident, or
      that would exceed max_loras distinct adapter slots, is skipped and waits; a request
      whose adapter failed to load is finished with ERROR. An admitted request first takes
      the longest cached chain of its leading full blocks under its adapter version (prefix
      caching, kv_cache_manager.py) and is scheduled from there.
2. the runner computes the scheduled tokens and samples one token for every request whose
   chunk reached the end of its known tokens;
3. `update()` appends the sampled tokens, registers newly computed full blocks in the
   prefix cache, applies stop conditions and returns deltas.

The engine calls `update()` after every `schedule()`, also after an empty one (with an
empty ModelRunnerOutput): admission errors found by `schedule()` come back from there.

Adapters. A cold adapter is prefetched when its request is queued, and again every step
in which admission skips one of its requests (the store may have dropped the hint).

Starvation bound. Skipping non-resident adapters keeps cold adapters from blocking everyone,
but a busy set of warm adapters could keep every slot pinned forever, so a cold adapter
never loads. Therefore a request that has been waiting (since it was queued or last
preempted) longer than `starvation_bound_s` becomes a barrier: when admission reaches it and
cannot admit it, admission stops, so nothing queued behind it is admitted until it is. Then
no new pins are taken behind it, the running requests finish (each within its remaining
max_tokens / max_model_len steps), their pins drain, the store loads its adapter into a
freed slot, and it is admitted. So a request whose adapter can be loaded waits at most about

    starvation_bound_s + T_drain + T_load + one step,

where T_drain is the time the requests running (or preempted and queued ahead of it) when it
became a barrier need to finish, or to free one slot when that is enough, and T_load is one
adapter load by the store. This assumes the store keeps a freshly loaded adapter until it
is pinned (see residency.py). Requests ahead of the barrier may still be admitted: they are
older, or were running when the barrier formed, so the set ahead of it only shrinks.
The barrier only orders admissions; KV blocks are first come, first served anyway.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from loramux.scheduler.config import SchedulerConfig, SchedulerConfigError
from loramux.scheduler.kv_cache_manager import CachedPrefix, KVCacheManager
from loramux.scheduler.output import ModelRunnerOutput, RequestDelta, SchedulerOutput, TokenLogprobs
from loramux.scheduler.prefix_cache_stats import PrefixCacheStats
from loramux.scheduler.request import BASE_SLOT, FinishReason, Request, RequestStatus
from loramux.scheduler.residency import AdapterResidency
from loramux.scheduler.stop import check_stop


class PromptTooLong(ValueError):
    """The prompt leaves no room for one output token within max_model_len."""


class DuplicateRequestId(ValueError):
    """A request with this id is already waiting or running."""


class Scheduler:
    """Continuous batching over one KV-cache pool and the device's adapter slots.

    Single-threaded: the engine loop calls add_request / finish_requests / schedule /
    update from one thread. See the module docstring for the step and the starvation bound.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        residency: AdapterResidency,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if config.max_loras > residency.num_slots:
            raise SchedulerConfigError(
                f"max_loras ({config.max_loras}) exceeds the device's adapter slots "
                f"({residency.num_slots})"
            )
        self.config = config
        self.kv_cache = KVCacheManager(
            config.num_kv_blocks, config.block_size, config.enable_prefix_caching
        )
        self._residency = residency
        self._clock = clock
        self._requests: dict[str, Request] = {}  # request_id -> every unfinished request
        self._waiting: deque[Request] = deque()  # queue order; preempted ones at the front
        self._running: list[Request] = []  # admission order, oldest first
        self._waiting_since: dict[str, float] = {}  # request_id -> clock() when (re)queued
        self._finished_ids: set[str] = set()  # finished since the last schedule()
        self._pending_deltas: list[RequestDelta] = []  # finished inside schedule(), not reported
        self._prompt_logprobs = _PromptLogprobsCursor()

    # ---------------------------------------------------------------- requests in and out

    def add_request(self, request: Request) -> None:
        """Queue a new request; a cold adapter starts loading now."""
        if request.request_id in self._requests:
            raise DuplicateRequestId(f"request {request.request_id!r} is already queued")
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens:
            raise ValueError(f"request {request.request_id!r} is not a fresh request")
        if request.num_tokens >= self.config.max_model_len:
            raise PromptTooLong(
                f"prompt of {request.num_tokens} tokens leaves no room for output within "
                f"max_model_len={self.config.max_model_len}"
            )
        self._requests[request.request_id] = request
        self._enqueue(request, front=False)
        if request.adapter_id is not None:
            self._residency.prefetch(request.adapter_id)

    def finish_requests(
        self,
        request_ids: str | Iterable[str],
        reason: FinishReason,
        error: str | None = None,
        stop_reason: int | str | None = None,
    ) -> None:
        """End waiting or running requests from outside (client abort, a stop string).

        Blocks and pins are released at once; unknown or already finished ids are ignored.
        No delta is produced: the caller already knows. Their ids reach the runner through
        the next SchedulerOutput.finished_request_ids. stop_reason: the stop string found.
        """
        ids = [request_ids] if isinstance(request_ids, str) else list(dict.fromkeys(request_ids))
        found = [self._requests[i] for i in ids if i in self._requests]
        if not found:
            return
        gone = {r.request_id for r in found}
        self._running = [r for r in self._running if r.request_id not in gone]
        self._waiting = deque(r for r in self._waiting if r.request_id not in gone)
        for request in found:
            self._finish(request, reason, error=error, stop_reason=stop_reason)

    # ------------------------------------------------------------------------ one step

    def schedule(self) -> SchedulerOutput:
        """Decide this step: running requests first, then admissions if none was preempted."""
        plan = _StepPlan(token_budget=self.config.max_num_batched_tokens)
        self._schedule_running(plan)
        if not plan.preempted:
            self._admit_waiting(plan)
        output = SchedulerOutput(
            scheduled_requests=plan.requests,
            num_scheduled_tokens=plan.num_tokens,
            total_num_scheduled_tokens=sum(plan.num_tokens),
            finished_request_ids=frozenset(self._finished_ids),
            preempted_request_ids=frozenset(r.request_id for r in plan.preempted),
        )
        self._finished_ids = set()
        return output

    def update(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[RequestDelta]:
        """Apply one step's results; returns one delta per request that gained anything."""
        deltas, self._pending_deltas = self._pending_deltas, []
        for request, num_tokens in zip(
            scheduler_output.scheduled_requests, scheduler_output.num_scheduled_tokens
        ):
            if request.status is not RequestStatus.RUNNING:
                continue  # finished from outside between schedule() and update()
            delta = self._apply_step(request, num_tokens, runner_output)
            if delta is not None:
                deltas.append(delta)
        self._running = [r for r in self._running if r.status is RequestStatus.RUNNING]
        return deltas

    # ------------------------------------------------------------ read-only figures

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_cache.usage

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Cumulative prefix-cache lookups and hits per adapter (safe to read from any thread)."""
        return self.kv_cache.stats

    @property
    def running_adapter_ids(self) -> frozenset[str]:
        return frozenset(r.adapter_id for r in self._running if r.adapter_id is not None)

    @property
    def waiting_adapter_ids(self) -> frozenset[str]:
        return frozenset(r.adapter_id for r in self._waiting if r.adapter_id is not None)

    @property
    def running_requests(self) -> tuple[Request, ...]:
        return tuple(self._running)

    @property
    def waiting_requests(self) -> tuple[Request, ...]:
        return tuple(self._waiting)

    def has_unfinished_requests(self) -> bool:
        """True while anything waits or runs, or a finished request is not yet reported."""
        return bool(self._waiting or self._running or self._pending_deltas)

    # ------------------------------------------------------------- schedule() helpers

    def _schedule_running(self, plan: _StepPlan) -> None:
        """Give each running request, oldest first, its next chunk; preempt when KV is full."""
        index = 0
        while index < len(self._running) and plan.token_budget > 0:
            request = self._running[index]
            num_new = self._chunk_size(request, plan.token_budget)
            if not self._allocate_or_preempt(request, num_new, plan):
                break  # it was the newest left, so nothing after it remains
            plan.add(request, num_new)
            index += 1

    def _allocate_or_preempt(self, request: Request, num_new: int, plan: _StepPlan) -> bool:
        """Allocate KV for request, preempting the newest running requests until it fits.

        Returns False when request itself had to be preempted.
        """
        while not self.kv_cache.allocate_slots(request, num_new):
            victim = self._running.pop()  # newest; never one already scheduled this step
            self._preempt(victim)
            plan.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        """Drop request's KV; it recomputes prompt + output so far later. It keeps its slot
        lease, so it resumes on the adapter version it started with even if that version
        was replaced or deleted meanwhile (the store keeps a leased slot as it is)."""
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self._prompt_logprobs.restart(request.request_id)
        self._enqueue(request, front=True)

    def _admit_waiting(self, plan: _StepPlan) -> None:
        """Admit waiting requests in queue order; skipped ones keep their place."""
        skipped: list[Request] = []
        running_slots = {r.adapter_slot for r in self._running if r.adapter_slot != BASE_SLOT}
        while (
            self._waiting
            and plan.token_budget > 0
            and len(self._running) < self.config.max_num_seqs
        ):
            request = self._waiting[0]
            outcome = self._try_admit(request, plan, running_slots)
            if outcome is _Admission.NO_ROOM:
                break  # first come, first served for KV blocks
            self._waiting.popleft()
            if outcome is _Admission.SKIPPED:
                skipped.append(request)
                if self._is_starving(request):
                    break  # barrier: nothing behind it is admitted before it
        self._waiting.extendleft(reversed(skipped))
        self._repeat_prefetch(skipped)

    def _repeat_prefetch(self, skipped: list[Request]) -> None:
        """Ask again for the cold adapters of skipped requests, once per adapter per step.

        The store may have consumed the enqueue-time hint and evicted the adapter again
        before its requests got in (say, while max_loras was full); repeating keeps every
        waiting request live without relying on the store's memory.
        """
        asked: set[str] = set()
        for request in skipped:
            adapter_id = request.adapter_id
            if adapter_id is None or adapter_id in asked or request.adapter_slot is not None:
                continue
            asked.add(adapter_id)
            if not self._residency.is_resident(adapter_id):
                self._residency.prefetch(adapter_id)

    def _try_admit(
        self, request: Request, plan: _StepPlan, running_slots: set[int]
    ) -> _Admission:
        """Admit the request at the head of the queue if its adapter, KV and max_loras allow."""
        held = request.adapter_slot  # a preempted request's lease, kept while it waited
        if held is None:
            error = self._load_error(request)
            if error is not None:
                self._pending_deltas.append(self._fail(request, error))  # reported by update()
                return _Admission.FAILED
            slot = self._lease_slot(request, running_slots)
            if slot is None:
                return _Admission.SKIPPED
        else:
            slot = held
            max_loras_full = len(running_slots) >= self.config.max_loras
            if slot != BASE_SLOT and slot not in running_slots and max_loras_full:
                return _Admission.SKIPPED  # waits with its lease, like any skipped request
        prefix = self._find_cached_prefix(request, slot)
        num_cached = len(prefix.block_ids) * self.config.block_size
        num_new = self._chunk_size(request, plan.token_budget, start=num_cached)
        if not self.kv_cache.admit(request, prefix, num_new):
            if held is None:
                self._unpin(slot)
            return _Admission.NO_ROOM
        request.num_computed_tokens = num_cached  # the cached prefix is not recomputed
        request.adapter_slot = slot
        request.status = RequestStatus.RUNNING
        self._waiting_since.pop(request.request_id)
        self._running.append(request)
        if slot != BASE_SLOT:
            running_slots.add(slot)
        plan.add(request, num_new)
        return _Admission.ADMITTED

    def _lease_slot(self, request: Request, running_slots: set[int]) -> int | None:
        """Pin request's adapter slot, or None when it must wait (cold, or max_loras full)."""
        adapter_id = request.adapter_id
        if adapter_id is None:
            return BASE_SLOT
        if not self._residency.is_resident(adapter_id):
            return None
        slot = self._residency.pin(adapter_id)
        if slot is None:
            return None  # evicted between is_resident and pin
        if slot not in running_slots and len(running_slots) >= self.config.max_loras:
            self._residency.unpin(slot)
            return None
        return slot

    def _find_cached_prefix(self, request: Request, slot: int) -> CachedPrefix:
        """The request's longest cached prefix under the adapter version its slot holds.

        Requests that want prompt logprobs compute every prompt position, so they only
        register their blocks for others and read nothing.
        """
        read = request.sampling_params.prompt_logprobs is None
        scale = request.sampling_params.adapter_scale
        if slot == BASE_SLOT or scale == 0.0:  # scale 0 runs the base model: its K/V are the base's
            return self.kv_cache.find_cached_prefix(request, None, None, read=read)
        version = self._residency.slot_version(slot)
        return self.kv_cache.find_cached_prefix(request, request.adapter_id, version, read=read, adapter_scale=scale)

    def _load_error(self, request: Request) -> str | None:
        if request.adapter_id is None:
            return None
        return self._residency.load_error(request.adapter_id)

    def _chunk_size(self, request: Request, token_budget: int, start: int | None = None) -> int:
        """Tokens request computes this step from `start` (default: num_computed_tokens):
        the rest it needs, capped by budget and chunk cap."""
        start = request.num_computed_tokens if start is None else start
        num_new = request.num_tokens - start
        assert num_new > 0, f"{request.request_id} has nothing to compute"
        if self.config.long_prefill_token_threshold:
            num_new = min(num_new, self.config.long_prefill_token_threshold)
        return min(num_new, token_budget)

    def _is_starving(self, request: Request) -> bool:
        waited = self._clock() - self._waiting_since[request.request_id]
        return waited > self.config.starvation_bound_s

    # --------------------------------------------------------------- update() helpers

    def _apply_step(
        self, request: Request, num_tokens: int, runner_output: ModelRunnerOutput
    ) -> RequestDelta | None:
        request_id = request.request_id
        if request_id in runner_output.failed:
            return self._fail(request, runner_output.failed[request_id])
        request.num_computed_tokens += num_tokens
        assert request.num_computed_tokens <= request.num_tokens
        self.kv_cache.cache_computed_blocks(request)  # written now: others may share them
        prompt_logprobs = self._prompt_logprobs.fresh(
            request_id, runner_output.prompt_logprobs.get(request_id, ())
        )
        if request.num_computed_tokens < request.num_tokens:
            # A prefill chunk short of the end: nothing was sampled.
            if not prompt_logprobs:
                return None
            return RequestDelta(request_id, [], False, prompt_logprobs=prompt_logprobs)
        token_id = runner_output.sampled_token_ids.get(request_id)
        if token_id is None:
            return self._fail(request, "the model runner returned no token for this request")
        request.append_output(token_id)
        stop = check_stop(request, self.config)
        if stop is not None:
            self._finish(request, stop.reason, stop_reason=stop.stop_reason)
        logprobs = runner_output.logprobs.get(request_id)
        return RequestDelta(
            request_id,
            [token_id],
            request.is_finished,
            request.finish_reason,
            new_logprobs=[logprobs] if logprobs is not None else [],
            prompt_logprobs=prompt_logprobs,
            stop_reason=request.stop_reason,
        )

    def _fail(self, request: Request, error: str) -> RequestDelta:
        self._finish(request, FinishReason.ERROR, error=error)
        return RequestDelta(request.request_id, [], True, FinishReason.ERROR, error=error)

    # ------------------------------------------------------------------ bookkeeping

    def _enqueue(self, request: Request, front: bool) -> None:
        self._waiting_since[request.request_id] = self._clock()
        if front:
            self._waiting.appendleft(request)
        else:
            self._waiting.append(request)

    def _finish(
        self,
        request: Request,
        reason: FinishReason,
        error: str | None = None,
        stop_reason: int | str | None = None,
    ) -> None:
        """Mark request finished and release its blocks and pin. Callers unlink it from
        the waiting/running containers (update() sweeps running once per step)."""
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.error = error
        request.stop_reason = stop_reason
        self.kv_cache.free(request)
        self._release_slot(request)
        del self._requests[request.request_id]
        self._waiting_since.pop(request.request_id, None)
        self._prompt_logprobs.forget(request.request_id)
        self._finished_ids.add(request.request_id)

    def _release_slot(self, request: Request) -> None:
        if request.adapter_slot is not None:
            self._unpin(request.adapter_slot)
        request.adapter_slot = None

    def _unpin(self, slot: int) -> None:
        if slot != BASE_SLOT:
            self._residency.unpin(slot)


# ------------------------------------------------------------------ private helpers


class _Admission(enum.Enum):
    ADMITTED = "admitted"
    SKIPPED = "skipped"  # adapter not resident or max_loras full: stays queued
    FAILED = "failed"  # adapter load error: finished with ERROR
    NO_ROOM = "no_room"  # not enough KV blocks: admission stops here


@dataclass
class _StepPlan:
    """What one schedule() call has decided so far."""

    token_budget: int  # tokens left this step
    requests: list[Request] = field(default_factory=list)  # [num_scheduled]
    num_tokens: list[int] = field(default_factory=list)  # [num_scheduled]
    preempted: list[Request] = field(default_factory=list)  # [num_preempted]

    def add(self, request: Request, num_tokens: int) -> None:
        assert 0 < num_tokens <= self.token_budget
        self.requests.append(request)
        self.num_tokens.append(num_tokens)
        self.token_budget -= num_tokens


class _PromptLogprobsCursor:
    """Forwards each prompt logprob once, even when preemption recomputes the prompt.

    The runner returns prompt logprobs in prompt order for the positions it computes; after
    a preemption it recomputes from position 0 and returns the same entries again. Per
    request: `sent` = entries forwarded so far, `seen` = entries received since the last
    (re)start; an entry is new only once seen passes sent.
    """

    def __init__(self) -> None:
        self._sent: dict[str, int] = {}
        self._seen: dict[str, int] = {}

    def fresh(self, request_id: str, entries: Iterable[TokenLogprobs]) -> list[TokenLogprobs]:
        entries = list(entries)
        if not entries:
            return []
        sent = self._sent.get(request_id, 0)
        seen = self._seen.get(request_id, 0)
        new = entries[max(0, sent - seen) :]
        self._seen[request_id] = seen + len(entries)
        self._sent[request_id] = max(sent, seen + len(entries))
        return new

    def restart(self, request_id: str) -> None:
        self._seen.pop(request_id, None)

    def forget(self, request_id: str) -> None:
        self._sent.pop(request_id, None)
        self._seen.pop(request_id, None)
