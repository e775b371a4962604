"""One step's sampling parameters as batch tensors, built once per step from the requests.

Row i of every [n] tensor belongs to requests[i]. Host flags say which filters any row
uses, so a batch of greedy requests without penalties costs one argmax. Built from flat
host lists in one copy per tensor (vLLM v1 `sample/metadata.py`); nothing here loops
over the vocabulary in Python.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loramux.scheduler.request import Request


@dataclass(frozen=True)
class Penalties:
    rows: torch.Tensor  # int64 [p]: the rows that have any penalty
    repetition: torch.Tensor  # fp32 [p, 1]: HF repetition penalty (1 = off)
    presence: torch.Tensor  # fp32 [p, 1]: OpenAI presence penalty
    frequency: torch.Tensor  # fp32 [p, 1]: OpenAI frequency penalty
    seen: torch.Tensor  # bool [p, vocab]: token occurs in the prompt or the output
    output_counts: torch.Tensor  # fp32 [p, vocab]: occurrences in the output


@dataclass(frozen=True)
class LogitBias:
    rows: torch.Tensor  # int64 [num_entries]
    token_ids: torch.Tensor  # int64 [num_entries]
    values: torch.Tensor  # fp32 [num_entries]


@dataclass(frozen=True)
class Filters:
    """The random rows' temperature and truncation, [m] = number of random rows."""

    rows: torch.Tensor  # int64 [m]: rows that draw at random (temperature > 0)
    temperature: torch.Tensor  # fp32 [m, 1]
    top_k: torch.Tensor | None  # int64 [m, 1], vocab = off; None: no row uses it
    top_p: torch.Tensor | None  # fp32 [m, 1], 1 = off
    min_p: torch.Tensor | None  # fp32 [m, 1], 0 = off
    typical_rows: torch.Tensor | None  # int64 [t]: indices into the m rows with typical_p < 1
    typical_p: torch.Tensor | None  # fp32 [t, 1]


@dataclass(frozen=True)
class SamplingMetadata:
    num_rows: int
    random_indices: list[int]  # host copy of filters.rows
    filters: Filters | None  # None: every row is greedy
    penalties: Penalties | None  # None: no row has a penalty
    logit_bias: LogitBias | None  # None: no row has a bias
    logprob_rows: list[int]  # rows that report logprobs
    logprob_tops: list[int]  # [len(logprob_rows)] top alternatives each wants


def build_sampling_metadata(requests: Sequence[Request], vocab: int, device: torch.device) -> SamplingMetadata:
    params = [r.sampling_params for r in requests]
    random_indices = [i for i, p in enumerate(params) if not p.greedy]
    logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    return SamplingMetadata(
        num_rows=len(requests),
        random_indices=random_indices,
        filters=_filters(requests, random_indices, vocab, device) if random_indices else None,
        penalties=_penalties(requests, vocab, device),
        logit_bias=_logit_bias(requests, vocab, device),
        logprob_rows=logprob_rows,
        logprob_tops=[params[i].logprobs or 0 for i in logprob_rows],
    )


def _column(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device).unsqueeze(1)


def _filters(requests: Sequence[Request], rows: list[int], vocab: int, device: torch.device) -> Filters:
    params = [requests[i].sampling_params for i in rows]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    typical = [j for j, p in enumerate(params) if p.typical_p < 1.0]
    return Filters(
        rows=torch.tensor(rows, dtype=torch.int64, device=device),
        temperature=_column([p.temperature for p in params], torch.float32, device),
        top_k=_column(top_k, torch.int64, device) if any(k < vocab for k in top_k) else None,
        top_p=_column([p.top_p for p in params], torch.float32, device) if any(p.top_p < 1.0 for p in params) else None,
        min_p=_column([p.min_p for p in params], torch.float32, device) if any(p.min_p > 0.0 for p in params) else None,
        typical_rows=torch.tensor(typical, dtype=torch.int64, device=device) if typical else None,
        typical_p=_column([params[j].typical_p for j in typical], torch.float32, device) if typical else None,
    )


def _scatter_tokens(token_lists: list[list[int]], vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (row, token id) indices of p token lists, ids outside the vocabulary dropped."""
    lengths = torch.tensor([len(ids) for ids in token_lists], dtype=torch.int64)
    flat = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.int64)
    rows = torch.repeat_interleave(torch.arange(len(token_lists)), lengths)
    inside = flat < vocab
    return rows[inside].to(device), flat[inside].to(device)


def _penalties(requests: Sequence[Request], vocab: int, device: torch.device) -> Penalties | None:
    rows = [
        i for i, r in enumerate(requests)
        if r.sampling_params.repetition_penalty != 1.0 or r.sampling_params.presence_penalty
        or r.sampling_params.frequency_penalty
    ]
    if not rows:
        return None
    params = [requests[i].sampling_params for i in rows]
    seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)  # [p, vocab]
    repetition_rows = [j for j, p in enumerate(params) if p.repetition_penalty != 1.0]
    if repetition_rows:
        # transformers' RepetitionPenaltyLogitsProcessor: over prompt and output.
        index = _scatter_tokens([requests[rows[j]].all_token_ids for j in repetition_rows], vocab, device)
        rows_of = torch.tensor(repetition_rows, dtype=torch.int64, device=device)
        seen[rows_of[index[0]], index[1]] = True
    counts = torch.zeros(len(rows), vocab, dtype=torch.float32, device=device)  # [p, vocab]
    # OpenAI semantics: over the generated tokens only.
    out_rows, out_ids = _scatter_tokens([requests[i].output_token_ids for i in rows], vocab, device)
    counts.index_put_((out_rows, out_ids), torch.ones_like(out_ids, dtype=torch.float32), accumulate=True)
    return Penalties(
        rows=torch.tensor(rows, dtype=torch.int64, device=device),
        repetition=_column([p.repetition_penalty for p in params], torch.float32, device),
        presence=_column([p.presence_penalty for p in params], torch.float32, device),
        frequency=_column([p.frequency_penalty for p in params], torch.float32, device),
        seen=seen,
        output_counts=counts,
    )


def _logit_bias(requests: Sequence[Request], vocab: int, device: torch.device) -> LogitBias | None:
    entries = [
        (i, token_id, bias)
        for i, r in enumerate(requests)
        for token_id, bias in r.sampling_params.logit_bias
        if token_id < vocab
    ]
    if not entries:
        return None
    rows, token_ids, values = zip(*entries)
    return LogitBias(
        rows=torch.tensor(rows, dtype=torch.int64, device=device),
        token_ids=torch.tensor(token_ids, dtype=torch.int64, device=device),
        values=torch.tensor(values, dtype=torch.float32, device=device),
    )
