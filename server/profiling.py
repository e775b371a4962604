"""Where a step's time goes: `bench-engine --profile`.

`attach_step_profiler(core)` times one engine's steps by phase, from the outside, so the
serving code carries no timers and no profiling branches:
    schedule     Scheduler.schedule
    prepare      ModelRunner.prepare (host metadata, the step's one host-to-device copy)
    forward      the model's forward, without the two below
    lora         every LoraBackend.prepare / add_lora call
    attention    every AttentionBackend.forward call (cache writes, prefill, decode)
    sample       the rest of ModelRunner.execute: logits, sampler, prompt logprobs
    update       Scheduler.update
    detokenize   EngineCore._process (incremental detokenization, stop strings)
The engine's and scheduler's methods and the model's two backends are wrapped on the
instances (the classes are untouched) by `attach_step_profiler`, and `detach` restores them.
On CUDA every timed call is synchronized first and last, so the figures are device time.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

PHASES = ("schedule", "prepare", "forward", "lora", "attention", "sample", "update", "detokenize")


@dataclass
class StepProfile:
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    num_steps: int = 0
    total_s: float = 0.0  # wall time of the profiled steps

    def summary(self) -> dict[str, Any]:
        """Per phase: total seconds, ms per step and share of the step time."""
        steps = max(self.num_steps, 1)
        total = self.total_s or 1e-12
        phases = {
            name: {"s": s, "ms_per_step": s * 1e3 / steps, "share": s / total} for name, s in self.seconds.items()
        }
        other = self.total_s - sum(self.seconds.values())
        phases["other"] = {"s": other, "ms_per_step": other * 1e3 / steps, "share": other / total}
        return {"steps": self.num_steps, "step_ms": self.total_s * 1e3 / steps, "phases": phases}

    def table(self) -> str:
        summary = self.summary()
        lines = [f"  profile: {summary['steps']} steps, {summary['step_ms']:.2f} ms per step"]
        for name, row in summary["phases"].items():
            lines.append(f"    {name:<11} {row['ms_per_step']:8.3f} ms/step {100 * row['share']:6.1f}%")
        return "\n".join(lines)


class _Clock:
    """Nested phase timing: time spent in an inner phase is not counted in the outer one."""

    def __init__(self, profile: StepProfile, sync: Callable[[], None]) -> None:
        self.profile = profile
        self.sync = sync
        self._stack: list[list] = []  # [name, start, inner seconds]

    def wrap(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.sync()
            self._stack.append([name, time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                _, start, inner = self._stack.pop()
                elapsed = time.perf_counter() - start
                if name is not None:
                    self.profile.seconds[name] += elapsed - inner
                if self._stack:
                    self._stack[-1][2] += elapsed

        return timed


class _BackendProxy:
    """Forwards every attribute to the wrapped backend; the named methods are timed."""

    def __init__(self, inner: Any, timed: dict[str, Callable]) -> None:
        self._inner = inner
        self.__dict__.update(timed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@dataclass
class AttachedProfiler:
    profile: StepProfile
    _restore: list[Callable[[], None]]

    def detach(self) -> None:
        for restore in reversed(self._restore):
            restore()
        self._restore.clear()


def attach_step_profiler(core) -> AttachedProfiler:
    """Time `core`'s steps by phase (see the module docstring) until `detach`."""
    runner, scheduler, model = core.runner, core.scheduler, core.runner.model
    cuda = model.device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(model.device)) if cuda else (lambda: None)
    profile = StepProfile()
    clock = _Clock(profile, sync)
    restore: list[Callable[[], None]] = []

    def patch(obj: Any, attribute: str, phase: str | None) -> None:
        original = getattr(obj, attribute)
        had_own = attribute in vars(obj)
        setattr(obj, attribute, clock.wrap(phase, original))
        restore.append(lambda: setattr(obj, attribute, original) if had_own else delattr(obj, attribute))

    patch(scheduler, "schedule", "schedule")
    patch(scheduler, "update", "update")
    patch(runner, "prepare", "prepare")
    patch(runner, "forward", "forward")
    patch(runner, "execute", "sample")  # what execute does besides prepare and forward
    patch(core, "_process", "detokenize")
    for attribute, names in (("lora_backend", ("prepare", "add_lora")), ("attention_backend", ("forward",))):
        inner = getattr(model, attribute)
        phase = "lora" if attribute == "lora_backend" else "attention"
        proxy = _BackendProxy(inner, {n: clock.wrap(phase, getattr(inner, n)) for n in names})
        setattr(model, attribute, proxy)
        restore.append(functools.partial(setattr, model, attribute, inner))

    step = core.step

    @functools.wraps(step)
    def profiled_step(*args, **kwargs):
        started = time.perf_counter()
        try:
            return clock.wrap(None, step)(*args, **kwargs)
        finally:
            profile.num_steps += 1
            profile.total_s += time.perf_counter() - started

    core.step = profiled_step
    restore.append(lambda: delattr(core, "step"))
    return AttachedProfiler(profile, restore)
