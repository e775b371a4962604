"""Run requests to completion in the calling thread (benchmarks, tests, batch jobs)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.engine_core import EngineCore
from loramux.server.outputs import CompletedRequest

# How long a step that scheduled nothing (every request waits for its adapter to load)
# sleeps before the next: spinning would take the CPU and the GIL from the loader thread.
STALLED_WAIT_S = 0.001


@dataclass(frozen=True)
class OfflineRequest:
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_id: str | None = None


class OfflineEngine:
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._ids = itertools.count()

    def generate(self, requests: list[OfflineRequest]) -> list[CompletedRequest]:
        """Submit all at once and step until every one finished; results in input order."""
        results: dict[str, CompletedRequest] = {}
        order = []
        for request in requests:
            request_id = f"offline-{next(self._ids)}"
            self.core.add_request(request_id, request.prompt_token_ids, request.params, request.adapter_id)
            results[request_id] = CompletedRequest(request_id)
            order.append(request_id)
        pending = set(order)
        while pending:
            outputs = self.core.step()
            for output in outputs:
                if output.request_id in results:
                    results[output.request_id].add(output)
                    if output.finished:
                        pending.discard(output.request_id)
            if not outputs and self.core.last_step.num_scheduled_requests == 0:
                time.sleep(STALLED_WAIT_S)
        return [results[i] for i in order]
