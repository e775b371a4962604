"""Scheduler test kit: fake adapter residency, request factory, step driver, invariants.

No torch and no model: a "step" is schedule() -> a fake sampler -> update().
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from loramux.scheduler.config import SchedulerConfig
from loramux.scheduler.output import ModelRunnerOutput, RequestDelta, SchedulerOutput, TokenLogprobs
from loramux.scheduler.request import BASE_SLOT, FinishReason, Request, RequestStatus
from loramux.scheduler.sampling_params import SamplingParams
from loramux.scheduler.scheduler import Scheduler

EOS = 2  # the fake model's EOS id


class FakeResidency:
    """Adapter residency the test sets by hand; checks that pins and unpins match."""

    def __init__(self, num_slots: int = 4, resident: Iterable[str] = ()) -> None:
        self.num_slots = num_slots
        self.slot_of: dict[str, int] = {}  # resident adapter -> its slot
        self.refcount: Counter[int] = Counter()  # slot -> pins held
        self.errors: dict[str, str] = {}  # adapter -> load error message
        self.prefetched: list[str] = []  # every prefetch call, in order
        self.slot_versions: dict[int, int] = {}  # slot -> version of the adapter it holds
        self._last_version: Counter[str] = Counter()  # adapter -> its newest version
        for adapter_id in resident:
            self.make_resident(adapter_id)

    # test controls
    def make_resident(self, adapter_id: str, slot: int | None = None) -> int:
        if adapter_id in self.slot_of:
            return self.slot_of[adapter_id]
        if slot is None:
            slot = min(set(range(self.num_slots)) - set(self.slot_of.values()))
        assert slot not in self.slot_of.values(), f"slot {slot} is taken"
        self._install(adapter_id, slot)
        return slot

    def _install(self, adapter_id: str, slot: int) -> None:
        """Every load is a new version of the adapter (as in the store: never repeated)."""
        self._last_version[adapter_id] += 1
        self.slot_of[adapter_id] = slot
        self.slot_versions[slot] = self._last_version[adapter_id]

    def evict(self, adapter_id: str) -> None:
        slot = self.slot_of.pop(adapter_id)
        assert self.refcount[slot] == 0, "evicted a pinned slot"

    def evict_if_unpinned(self, adapter_id: str) -> None:
        slot = self.slot_of.get(adapter_id)
        if slot is not None and self.refcount[slot] == 0:
            self.evict(adapter_id)

    def fail(self, adapter_id: str, message: str = "adapter not found") -> None:
        self.errors[adapter_id] = message
        if adapter_id in self.slot_of and self.refcount[self.slot_of[adapter_id]] == 0:
            self.evict(adapter_id)

    @property
    def num_pins(self) -> int:
        return sum(self.refcount.values())

    def is_pinned(self, adapter_id: str) -> bool:
        return adapter_id in self.slot_of and self.refcount[self.slot_of[adapter_id]] > 0

    # AdapterResidency
    def is_resident(self, adapter_id: str) -> bool:
        return adapter_id in self.slot_of

    def prefetch(self, adapter_id: str) -> None:
        self.prefetched.append(adapter_id)

    def pin(self, adapter_id: str) -> int | None:
        slot = self.slot_of.get(adapter_id)
        if slot is not None:
            self.refcount[slot] += 1
        return slot

    def unpin(self, slot: int) -> None:
        assert slot != BASE_SLOT, "the base slot is never pinned"
        assert self.refcount[slot] > 0, f"unpin of slot {slot} without a pin"
        self.refcount[slot] -= 1

    def load_error(self, adapter_id: str) -> str | None:
        return self.errors.get(adapter_id)

    def slot_version(self, slot: int) -> int:
        assert self.refcount[slot] > 0, f"slot_version of slot {slot} without a pin"
        return self.slot_versions[slot]


class LoadingResidency(FakeResidency):
    """A small store: prefetched adapters load `load_steps` ticks after they get a slot.

    A slot is free, or held by an unpinned resident adapter (evicted, least recently
    pinned first). Pinned slots are never touched, so a load waits while all are pinned.
    A freshly loaded adapter is not evicted for `grace` ticks, so it can be pinned first
    (a store without this thrashes when every slot is wanted).
    """

    def __init__(self, num_slots: int, load_steps: int = 1, grace: int = 2) -> None:
        super().__init__(num_slots)
        self.load_steps = load_steps
        self.grace = grace
        self.now = 0
        self._wanted: list[str] = []  # prefetched, not yet loading
        self._loading: dict[str, tuple[int, int]] = {}  # adapter -> (slot, ready tick)
        self._last_pin: dict[str, int] = {}  # adapter -> tick of its last pin or load

    def prefetch(self, adapter_id: str) -> None:
        super().prefetch(adapter_id)
        if (
            adapter_id not in self.errors
            and adapter_id not in self.slot_of
            and adapter_id not in self._loading
            and adapter_id not in self._wanted
        ):
            self._wanted.append(adapter_id)

    def pin(self, adapter_id: str) -> int | None:
        self._last_pin[adapter_id] = max(self.now, self._last_pin.get(adapter_id, -1))
        return super().pin(adapter_id)

    def tick(self) -> None:
        """Advance one step: finish due loads, then start loads for wanted adapters."""
        self.now += 1
        for adapter_id, (slot, ready) in list(self._loading.items()):
            if ready <= self.now:
                del self._loading[adapter_id]
                self._install(adapter_id, slot)
                self._last_pin[adapter_id] = self.now + self.grace
        while self._wanted:
            slot = self._claim_slot()
            if slot is None:
                return
            adapter_id = self._wanted.pop(0)
            self._loading[adapter_id] = (slot, self.now + self.load_steps)

    def _claim_slot(self) -> int | None:
        taken = set(self.slot_of.values()) | {slot for slot, _ in self._loading.values()}
        free = sorted(set(range(self.num_slots)) - taken)
        if free:
            return free[0]
        unpinned = [
            a
            for a in self.slot_of
            if self.refcount[self.slot_of[a]] == 0 and self._last_pin.get(a, -1) < self.now
        ]
        if not unpinned:
            return None
        victim = min(unpinned, key=lambda a: self._last_pin.get(a, -1))
        return self.slot_of.pop(victim)


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


_ids = itertools.count()


def make_request(
    request_id: str | None = None,
    prompt_len: int = 8,
    max_tokens: int = 4,
    adapter_id: str | None = None,
    **params,
) -> Request:
    return Request(
        request_id=request_id if request_id is not None else f"r{next(_ids)}",
        prompt_token_ids=[10 + i % 50 for i in range(prompt_len)],
        sampling_params=SamplingParams(max_tokens=max_tokens, **params),
        adapter_id=adapter_id,
    )


def make_scheduler(
    residency: FakeResidency | None = None,
    clock: Callable[[], float] | None = None,
    **config,
) -> Scheduler:
    defaults = dict(
        max_num_batched_tokens=64,
        max_num_seqs=8,
        num_kv_blocks=64,
        block_size=4,
        max_model_len=128,
        max_loras=2,
        eos_token_ids=frozenset({EOS}),
    )
    defaults.update(config)
    residency = residency if residency is not None else FakeResidency(defaults["max_loras"])
    kwargs = {"clock": clock} if clock is not None else {}
    return Scheduler(SchedulerConfig(**defaults), residency, **kwargs)


def counting_sampler(request: Request) -> int:
    """A token that never repeats and is never EOS: 1000 + output position."""
    return 1000 + request.num_output_tokens


def sampled_this_step(output: SchedulerOutput) -> list[Request]:
    """Requests whose chunk reaches the end of their known tokens: the runner samples them."""
    return [
        r
        for r, n in zip(output.scheduled_requests, output.num_scheduled_tokens)
        if r.num_computed_tokens + n == r.num_tokens
    ]


def step(
    scheduler: Scheduler,
    sample: Callable[[Request], int] = counting_sampler,
    failed: dict[str, str] | None = None,
    with_logprobs: bool = False,
) -> tuple[SchedulerOutput, list[RequestDelta]]:
    """One engine step: schedule, check invariants, fake-sample, update."""
    output = scheduler.schedule()
    check_step(scheduler, output)
    sampled = {r.request_id: sample(r) for r in sampled_this_step(output)}
    logprobs = {}
    if with_logprobs:
        logprobs = {rid: TokenLogprobs(tok, -0.5, 1) for rid, tok in sampled.items()}
    runner_output = ModelRunnerOutput(sampled, logprobs=logprobs, failed=failed or {})
    return output, scheduler.update(output, runner_output)


@dataclass
class Trace:
    """Everything a driven run produced."""

    outputs: list[SchedulerOutput] = field(default_factory=list)
    tokens: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    finished: dict[str, RequestDelta] = field(default_factory=dict)  # id -> final delta

    def record(self, output: SchedulerOutput, deltas: list[RequestDelta]) -> None:
        self.outputs.append(output)
        for delta in deltas:
            assert delta.request_id not in self.finished, "delta after the final one"
            self.tokens[delta.request_id].extend(delta.new_token_ids)
            if delta.finished:
                self.finished[delta.request_id] = delta


def drive(
    scheduler: Scheduler,
    max_steps: int = 1000,
    sample: Callable[[Request], int] = counting_sampler,
    before_step: Callable[[int], None] | None = None,
    trace: Trace | None = None,
) -> Trace:
    """Step until nothing is left; fails when that takes more than max_steps."""
    trace = trace if trace is not None else Trace()
    for index in range(max_steps):
        if before_step is not None:
            before_step(index)
        if not scheduler.has_unfinished_requests():
            return trace
        trace.record(*step(scheduler, sample))
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def check_step(scheduler: Scheduler, output: SchedulerOutput) -> None:
    """Invariants that hold after every schedule()."""
    config = scheduler.config
    scheduled = output.scheduled_requests
    # token budget
    assert len(scheduled) == len(output.num_scheduled_tokens)
    assert output.total_num_scheduled_tokens == sum(output.num_scheduled_tokens)
    assert output.total_num_scheduled_tokens <= config.max_num_batched_tokens
    assert len({r.request_id for r in scheduled}) == len(scheduled), "scheduled twice"
    for request, n in zip(scheduled, output.num_scheduled_tokens):
        assert request.status is RequestStatus.RUNNING
        assert 1 <= n <= request.num_tokens - request.num_computed_tokens
        if config.long_prefill_token_threshold:
            assert n <= config.long_prefill_token_threshold
        # KV blocks cover every token computed by the end of this step
        needed = scheduler.kv_cache.num_blocks_for(request.num_computed_tokens + n)
        assert len(request.block_ids) >= needed
    # running cap and adapters per step
    running = scheduler.running_requests
    assert len(running) <= config.max_num_seqs
    assert set(scheduled) <= set(running)
    adapter_slots = {r.adapter_slot for r in running if r.adapter_id is not None}
    assert len(adapter_slots) <= config.max_loras
    step_adapters = {r.adapter_id for r in scheduled if r.adapter_id is not None}
    assert len(step_adapters) <= config.max_loras
    check_resources(scheduler)


def check_resources(scheduler: Scheduler) -> None:
    """KV blocks and adapter pins are accounted exactly: nothing leaked or double-freed.

    A block is shared only through the prefix cache: then it is a full, computed block of
    every holder, in the same position, and its reference count is its number of holders.
    """
    running = scheduler.running_requests
    waiting = scheduler.waiting_requests
    kv = scheduler.kv_cache
    for request in running:
        assert len(request.block_ids) == len(set(request.block_ids)), "a block is held twice"
    held = {b for r in running for b in r.block_ids}
    assert len(held) + kv.num_free_blocks == scheduler.config.num_kv_blocks
    kv.check_invariants(list(running))
    positions: dict[int, set[int]] = defaultdict(set)
    for request in running:
        for index, block in enumerate(request.block_ids):
            if kv.ref_count(block) > 1:
                positions[block].add(index)
                assert (index + 1) * kv.block_size <= request.num_computed_tokens, (
                    "a shared block is not a full computed block of every holder"
                )
    assert all(len(p) == 1 for p in positions.values()), "a shared block at two positions"
    if not kv.enable_prefix_caching:
        assert all(kv.ref_count(b) == 1 for b in held), "blocks shared with caching off"
    for request in waiting:
        assert request.block_ids == [] and request.num_computed_tokens == 0
        # only a preempted request keeps a lease while it waits
        assert request.adapter_slot is None or request.num_preemptions > 0
    for request in running:
        if request.adapter_id is None:
            assert request.adapter_slot == BASE_SLOT
    residency = scheduler._residency
    if isinstance(residency, FakeResidency):
        pins = Counter(
            r.adapter_slot
            for r in (*running, *waiting)
            if r.adapter_id is not None and r.adapter_slot is not None
        )
        assert +residency.refcount == pins, (residency.refcount, pins)


def check_drained(scheduler: Scheduler) -> None:
    """Nothing left: every block free, every pin returned."""
    assert not scheduler.has_unfinished_requests()
    assert scheduler.num_waiting == scheduler.num_running == 0
    assert scheduler.kv_cache.num_free_blocks == scheduler.config.num_kv_blocks
    assert scheduler.kv_cache_usage == 0.0
    residency = scheduler._residency
    if isinstance(residency, FakeResidency):
        assert residency.num_pins == 0


def finished_with(trace: Trace, request_id: str) -> FinishReason | None:
    delta = trace.finished.get(request_id)
    return delta.finish_reason if delta is not None else None
