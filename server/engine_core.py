"""The synchronous engine step: schedule -> run the model -> update -> detokenize.

Single-threaded by design: the async engine (server/engine.py) runs it in its own thread
and the offline engine (server/offline.py) in the caller's. One request failing (in the
forward, the sampler, detokenization) ends that request with an error; the others go on: a
failed batch forward is retried request by request to find the culprit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from loramux.scheduler.output import ModelRunnerOutput, RequestDelta, SchedulerOutput
from loramux.scheduler.request import FinishReason, Request
from loramux.scheduler.sampling_params import SamplingParams
from loramux.scheduler.scheduler import Scheduler
from loramux.server.detokenizer import IncrementalDetokenizer
from loramux.server.outputs import RequestOutput
from loramux.server.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass
class _Tracked:
    request: Request
    detokenizer: IncrementalDetokenizer


@dataclass(frozen=True)
class StepStats:
    """Figures of the last step, for metrics."""

    num_scheduled_requests: int = 0
    num_scheduled_tokens: int = 0
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    step_seconds: float = 0.0


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner, tokenizer) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.tokenizer = tokenizer
        self._tracked: dict[str, _Tracked] = {}
        self.last_step = StepStats()

    @property
    def max_model_len(self) -> int:
        return self.scheduler.config.max_model_len

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter_id: str | None = None,
    ) -> None:
        """Queue a request. Raises PromptTooLong / DuplicateRequestId / ValueError at once."""
        request = Request(request_id, list(prompt_token_ids), params, adapter_id=adapter_id)
        self.scheduler.add_request(request)
        self._tracked[request_id] = _Tracked(
            request,
            IncrementalDetokenizer(
                self.tokenizer,
                stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
                skip_special_tokens=params.skip_special_tokens,
            ),
        )

    def abort(self, request_ids: list[str]) -> list[RequestOutput]:
        """Cancel requests; returns their final (abort) outputs. Unknown ids are ignored."""
        known = [i for i in request_ids if i in self._tracked]
        self.scheduler.finish_requests(known, FinishReason.ABORT)
        return [self._final(i, FinishReason.ABORT) for i in known]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        started = time.perf_counter()
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            runner_output = ModelRunnerOutput(sampled_token_ids={})
        else:
            try:
                runner_output = self.runner.execute(scheduler_output)
            except Exception:  # noqa: BLE001 - find the culprit: the others go on
                logger.exception("model step failed; retrying its requests one by one")
                runner_output = self._execute_one_by_one(scheduler_output)
        deltas = self.scheduler.update(scheduler_output, runner_output)
        now = time.monotonic()
        outputs = [self._process(delta, now) for delta in deltas]
        self.last_step = StepStats(
            num_scheduled_requests=len(scheduler_output.scheduled_requests),
            num_scheduled_tokens=scheduler_output.total_num_scheduled_tokens,
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=self.scheduler.kv_cache_usage,
            step_seconds=time.perf_counter() - started,
        )
        return [o for o in outputs if o is not None]

    def _execute_one_by_one(self, batch: SchedulerOutput) -> ModelRunnerOutput:
        """The batch's forward failed: run each request alone, so that only the request(s)
        that fail alone fail (the others get their tokens this step, as if nothing happened).
        Rerunning a request's chunk rewrites the same KV slots, so the failed batch leaves
        nothing behind."""
        sampled: dict[str, int] = {}
        logprobs: dict = {}
        prompt_logprobs: dict = {}
        failed: dict[str, str] = {}
        for i, (request, num_tokens) in enumerate(zip(batch.scheduled_requests, batch.num_scheduled_tokens)):
            single = SchedulerOutput(
                scheduled_requests=[request],
                num_scheduled_tokens=[num_tokens],
                total_num_scheduled_tokens=num_tokens,
                # the runner drops state of ended requests once, with the first sub-step
                finished_request_ids=batch.finished_request_ids if i == 0 else frozenset(),
                preempted_request_ids=batch.preempted_request_ids if i == 0 else frozenset(),
            )
            try:
                output = self.runner.execute(single)
            except Exception as exc:  # noqa: BLE001 - this request is the culprit
                logger.exception("request %s fails the model step on its own", request.request_id)
                failed[request.request_id] = f"model step failed: {type(exc).__name__}: {exc}"
                continue
            sampled.update(output.sampled_token_ids)
            logprobs.update(output.logprobs)
            prompt_logprobs.update(output.prompt_logprobs)
            failed.update(output.failed)
        return ModelRunnerOutput(sampled_token_ids=sampled, logprobs=logprobs,
                                 prompt_logprobs=prompt_logprobs, failed=failed)

    def _process(self, delta: RequestDelta, now: float) -> RequestOutput | None:
        tracked = self._tracked.get(delta.request_id)
        if tracked is None:
            return None
        request = tracked.request
        finished, reason, stop_reason, error = delta.finished, delta.finish_reason, delta.stop_reason, delta.error
        try:
            tokens = delta.new_token_ids
            if finished and reason is FinishReason.STOP and tokens and not _keeps_stop_token(request, delta):
                tokens = tokens[:-1]  # the EOS / stop token itself is not text
            for token_id in tokens:
                match = tracked.detokenizer.add_token(token_id)
                if match is not None:
                    self.scheduler.finish_requests(
                        request.request_id, FinishReason.STOP, stop_reason=match.stop_string
                    )
                    finished, reason, stop_reason = True, FinishReason.STOP, match.stop_string
                    break
            new_text = tracked.detokenizer.take_new_text(finished)
        except Exception as exc:  # noqa: BLE001 - detokenization failure ends this request only
            logger.exception("detokenization failed for request %s", request.request_id)
            self.scheduler.finish_requests(request.request_id, FinishReason.ERROR, error=str(exc))
            finished, reason, error, new_text = True, FinishReason.ERROR, f"detokenization failed: {exc}", ""
        if finished:
            del self._tracked[request.request_id]
        return RequestOutput(
            request_id=request.request_id,
            new_text=new_text,
            new_token_ids=list(delta.new_token_ids),
            finished=finished,
            finish_reason=reason,
            stop_reason=stop_reason,
            new_logprobs=list(delta.new_logprobs),
            prompt_logprobs=list(delta.prompt_logprobs),
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            error=error,
            timestamp=now,
        )

    def _final(self, request_id: str, reason: FinishReason) -> RequestOutput:
        tracked = self._tracked.pop(request_id)
        return RequestOutput(
            request_id=request_id,
            new_text=tracked.detokenizer.take_new_text(finished=True),
            new_token_ids=[],
            finished=True,
            finish_reason=reason,
            num_prompt_tokens=tracked.request.num_prompt_tokens,
            num_output_tokens=tracked.request.num_output_tokens,
            timestamp=time.monotonic(),
        )


def _keeps_stop_token(request: Request, delta: RequestDelta) -> bool:
    """A stop token id stays in the text only when the request asks for its stop strings."""
    return isinstance(delta.stop_reason, int) and request.sampling_params.include_stop_str_in_output
