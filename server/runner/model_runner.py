"""One step: SchedulerOutput -> one batched forward -> sampled tokens (ModelRunnerOutput).

The runner orders the step's sequences by adapter slot so that each adapter's tokens are
consecutive rows (LoRA segments), builds the step's metadata once, runs the model and
samples one token for every request whose scheduled chunk reaches the end of its tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from loramux.kernels.metadata import NO_ADAPTER, LoraBatchInfo, build_lora_batch_info, stage_lora_batch_info
from loramux.kernels.staging import DeviceUpload
from loramux.scheduler.output import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from loramux.scheduler.request import BASE_SLOT, Request
from loramux.server.models.protocol import ForwardBatch, ServingModel
from loramux.server.runner.sampler import Sampler, batch_token_logprobs
from loramux.server.structured.masks import GrammarMasks

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedStep:
    batch: ForwardBatch
    requests: list[Request]  # in row order (sorted by adapter slot)
    num_tokens: list[int]  # [num_requests] rows of each request
    row_starts: list[int]  # [num_requests] first row of each request
    sample_indices: list[int]  # indices into `requests` that get a new token this step
    sample_rows: torch.Tensor  # int64 [num_sampled]: the last row of each of those
    sample_lora: LoraBatchInfo  # the sampled rows' adapter slots (lm_head adapters)


def allocate_kv_caches(
    model: ServingModel, num_blocks: int, block_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    spec = model.spec
    shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
    return [
        (
            torch.zeros(shape, dtype=model.dtype, device=model.device),
            torch.zeros(shape, dtype=model.dtype, device=model.device),
        )
        for _ in range(spec.num_layers)
    ]


def kv_bytes_per_block(model: ServingModel, block_size: int) -> int:
    spec = model.spec
    elem = torch.empty((), dtype=model.dtype).element_size()
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * elem


class ModelRunner:
    def __init__(self, model: ServingModel, num_kv_blocks: int, block_size: int, seed: int = 0) -> None:
        self.model = model
        self.block_size = block_size
        self.kv_caches = allocate_kv_caches(model, num_kv_blocks, block_size)
        self.sampler = Sampler(model.device, seed)
        self.grammar_masks = GrammarMasks()

    def prepare(self, scheduler_output: SchedulerOutput) -> PreparedStep:
        scheduled = list(zip(scheduler_output.scheduled_requests, scheduler_output.num_scheduled_tokens))
        # Stable sort: each (adapter, scale) pair's tokens become one contiguous run (a LoRA segment).
        scheduled.sort(key=lambda pair: (_slot(pair[0]), _scale(pair[0])))
        requests = [r for r, _ in scheduled]
        num_tokens = [n for _, n in scheduled]
        input_ids: list[int] = []
        positions: list[int] = []
        row_starts: list[int] = []
        sample_indices: list[int] = []
        sample_rows: list[int] = []
        for index, (request, n) in enumerate(scheduled):
            start = request.num_computed_tokens
            row_starts.append(len(input_ids))
            input_ids.extend(request.all_token_ids[start : start + n])
            positions.extend(range(start, start + n))
            if start + n == request.num_tokens:  # the chunk reaches the end: sample
                sample_indices.append(index)
                sample_rows.append(len(input_ids) - 1)
        # Every builder stages its host tensors; they reach the device in one copy.
        upload = DeviceUpload(self.model.device)
        finish_lora = stage_lora_batch_info(
            [_slot(r) for r in requests], num_tokens, [_scale(r) for r in requests], upload
        )
        sampled = [requests[i] for i in sample_indices]
        finish_sample_lora = stage_lora_batch_info(
            [_slot(r) for r in sampled], [1] * len(sampled), [_scale(r) for r in sampled], upload
        )
        finish_attention = self.model.attention_backend.stage_metadata(
            [r.num_computed_tokens for r in requests],
            num_tokens,
            [r.block_ids for r in requests],
            self.block_size,
            self.model.spec.windows,
            upload,
        )
        ids = upload.add(torch.tensor(input_ids, dtype=torch.int64))
        pos = upload.add(torch.tensor(positions, dtype=torch.int64))
        rows = upload.add(torch.tensor(sample_rows, dtype=torch.int64))
        upload.send()
        batch = ForwardBatch(
            input_ids=upload.get(ids), positions=upload.get(pos), lora=finish_lora(), attention=finish_attention()
        )
        return PreparedStep(
            batch=batch,
            requests=requests,
            num_tokens=num_tokens,
            row_starts=row_starts,
            sample_indices=sample_indices,
            sample_rows=upload.get(rows),
            sample_lora=finish_sample_lora(),
        )

    def forward(self, step: PreparedStep) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] of the whole step."""
        self.model.lora_backend.prepare(step.batch.lora)  # once per step, before any layer
        return self.model.forward(step.batch, self.kv_caches)

    def compute_logits(self, rows: torch.Tensor, lora: LoraBatchInfo) -> torch.Tensor:
        """fp32 logits [n, vocab] of final hidden rows [n, hidden] whose slots `lora` gives
        (lm_head adapters apply)."""
        return self.model.compute_logits(rows, lora)

    def sample_logits(self, step: PreparedStep, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [num_sampled, vocab] of the rows this step samples from."""
        return self.compute_logits(hidden[step.sample_rows], step.sample_lora)

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self.sampler.forget(
            [*scheduler_output.finished_request_ids, *scheduler_output.preempted_request_ids]
        )
        if scheduler_output.is_empty:
            return ModelRunnerOutput(sampled_token_ids={})
        step = self.prepare(scheduler_output)
        hidden = self.forward(step)
        prompt_logprobs = self._prompt_logprobs(step, hidden)
        if not step.sample_indices:
            return ModelRunnerOutput(sampled_token_ids={}, prompt_logprobs=prompt_logprobs)
        logits = self.sample_logits(step, hidden)  # [num_sampled, vocab]
        to_sample = [step.requests[i] for i in step.sample_indices]
        logits = self.grammar_masks.apply(logits, to_sample)  # constrained rows masked
        try:
            tokens, logprobs = self.sampler.sample(logits, to_sample)
        except Exception:  # noqa: BLE001 - isolate the failing request, keep the rest
            return self._sample_one_by_one(logits, to_sample, prompt_logprobs)
        # The next masks are computed on a worker thread while the next step runs.
        self.grammar_masks.accept(to_sample, tokens, logits.shape[-1])
        return ModelRunnerOutput(
            sampled_token_ids={r.request_id: t for r, t in zip(to_sample, tokens)},
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )

    def _sample_one_by_one(
        self, logits: torch.Tensor, requests: list[Request], prompt_logprobs: dict
    ) -> ModelRunnerOutput:
        """A batch sample failed: retry row by row so only the culprit fails."""
        sampled: dict[str, int] = {}
        logprobs: dict[str, TokenLogprobs] = {}
        failed: dict[str, str] = {}
        for i, request in enumerate(requests):
            try:
                tokens, row_logprobs = self.sampler.sample(logits[i : i + 1], [request])
            except Exception as exc:  # noqa: BLE001
                logger.exception("sampling failed for request %s", request.request_id)
                failed[request.request_id] = f"sampling failed: {exc}"
                continue
            sampled[request.request_id] = tokens[0]
            logprobs.update(row_logprobs)
        return ModelRunnerOutput(
            sampled_token_ids=sampled, logprobs=logprobs, prompt_logprobs=prompt_logprobs, failed=failed
        )

    def _prompt_logprobs(self, step: PreparedStep, hidden: torch.Tensor) -> dict[str, list[TokenLogprobs]]:
        """Logprob of each prompt token given the ones before it, for requests that ask."""
        result: dict[str, list[TokenLogprobs]] = {}
        for index, request in enumerate(step.requests):
            top = request.sampling_params.prompt_logprobs
            start = request.num_computed_tokens
            if top is None or start >= request.num_prompt_tokens:
                continue
            # Row j predicts token start + j + 1; only prompt tokens are scored here.
            end = min(start + step.num_tokens[index], request.num_prompt_tokens - 1)
            if end <= start:
                result[request.request_id] = []
                continue
            rows = hidden[step.row_starts[index] : step.row_starts[index] + (end - start)]
            lora = build_lora_batch_info([_slot(request)], [len(rows)], [_scale(request)], device=rows.device)
            logprobs = torch.log_softmax(self.compute_logits(rows, lora), dim=-1)
            targets = request.all_token_ids[start + 1 : end + 1]
            result[request.request_id] = batch_token_logprobs(logprobs, targets, [top] * len(targets))
        return result


def _slot(request: Request) -> int:
    """The slot whose delta the request's rows get; scale 0 asks for the base model alone."""
    slot = request.adapter_slot
    if slot is None or slot == BASE_SLOT or request.sampling_params.adapter_scale == 0.0:
        return NO_ADAPTER
    return slot


def _scale(request: Request) -> float:
    """The multiplier of the request's LoRA delta (LoraBatchInfo.seg_scales)."""
    return 1.0 if _slot(request) == NO_ADAPTER else request.sampling_params.adapter_scale
