"""`python -m tests.e2e.fault_server serve ...`: `loramux serve` with faults injected, for
the fault tests only (nothing in the server itself knows about them).

LORAMUX_TEST_FAULTS, comma-separated:
  forward:<N>  the model forward raises whenever a request with max_tokens == N is in the
               batch (alone or not): the engine must fail that request only
  engine:<N>   the engine step raises SystemError (outside the forward: the engine thread
               dies) once a request with max_tokens == N is queued
  slowload:<MS> every adapter load takes MS milliseconds longer (on the loader thread), so
               requests on an adapter that is not resident wait queued meanwhile
"""

from __future__ import annotations

import os
import sys
import time

from loramux.adapter_store import store
from loramux.server.cli import main
from loramux.server.engine_core import EngineCore
from loramux.server.runner.model_runner import ModelRunner


def _faults() -> dict[str, int]:
    faults = {}
    for item in os.environ.get("LORAMUX_TEST_FAULTS", "").split(","):
        if item:
            kind, _, value = item.partition(":")
            faults[kind] = int(value)
    return faults


def install(faults: dict[str, int]) -> None:
    if "forward" in faults:
        poison = faults["forward"]
        execute = ModelRunner.execute

        def failing_execute(self, scheduler_output):
            if any(r.sampling_params.max_tokens == poison for r in scheduler_output.scheduled_requests):
                raise RuntimeError("injected forward failure")
            return execute(self, scheduler_output)

        ModelRunner.execute = failing_execute
    if "engine" in faults:
        fatal = faults["engine"]
        step = EngineCore.step

        def dying_step(self):
            if any(t.request.sampling_params.max_tokens == fatal for t in self._tracked.values()):
                raise SystemError("injected engine failure")
            return step(self)

        EngineCore.step = dying_step
    if "slowload" in faults:
        delay_s = faults["slowload"] / 1000
        load = store.load_adapter

        def slow_load(*args, **kwargs):
            time.sleep(delay_s)
            return load(*args, **kwargs)

        store.load_adapter = slow_load


if __name__ == "__main__":
    install(_faults())
    sys.exit(main())
