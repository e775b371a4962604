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
    """Sparse: (row, token) pairs of the tokens each penalized row has seen, so the cost
    grows with the tokens, not with rows x vocabulary."""

    seen_rows: torch.Tensor  # int64 [num_seen]: prompt and output tokens of rows with a repetition penalty
    seen_ids: torch.Tensor  # int64 [num_seen]
    seen_penalty: torch.Tensor  # fp32 [num_seen]: the row's repetition penalty, per pair
    output_rows: torch.Tensor  # int64 [num_out]: output tokens of rows with presence/frequency penalties
    output_ids: torch.Tensor  # int64 [num_out]
    frequency: torch.Tensor  # fp32 [num_out]: the row's frequency penalty, per pair
    presence: torch.Tensor  # fp32 [num_out]: the row's presence penalty, per pair


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


def _token_pairs(
    requests: Sequence[Request], rows: list[int], tokens_of, values_of, vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Flat (row, token id) pairs of the given rows' token lists (ids outside the vocabulary
    dropped), with each row's parameter values repeated along. One copy per tensor; the
    flat lists are built by list repetition (C speed), not per token in Python."""
    token_lists = [tokens_of(requests[i]) for i in rows]

    def repeated(per_row: list) -> list:
        return list(itertools.chain.from_iterable([v] * len(ids) for v, ids in zip(per_row, token_lists)))

    flat = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.int64)
    inside = flat < vocab
    keep_all = bool(inside.all())

    def column(values: list, dtype: torch.dtype) -> torch.Tensor:
        tensor = torch.tensor(values, dtype=dtype)
        return (tensor if keep_all else tensor[inside]).to(device)

    values = [column(repeated(v), torch.float32) for v in values_of([requests[i].sampling_params for i in rows])]
    return column(repeated(rows), torch.int64), (flat if keep_all else flat[inside]).to(device), values


def _penalties(requests: Sequence[Request], vocab: int, device: torch.device) -> Penalties | None:
    params = [r.sampling_params for r in requests]
    repetition = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    openai = [i for i, p in enumerate(params) if (p.presence_penalty or p.frequency_penalty)]
    if not repetition and not openai:
        return None
    # transformers' RepetitionPenaltyLogitsProcessor: over prompt and output.
    seen_rows, seen_ids, (seen_penalty,) = _token_pairs(
        requests, repetition, lambda r: r.all_token_ids, lambda ps: [[p.repetition_penalty for p in ps]], vocab, device
    )
    # OpenAI semantics: over the generated tokens only.
    output_rows, output_ids, (frequency, presence) = _token_pairs(
        requests, openai, lambda r: r.output_token_ids,
        lambda ps: [[p.frequency_penalty for p in ps], [p.presence_penalty for p in ps]], vocab, device,
    )
    return Penalties(seen_rows, seen_ids, seen_penalty, output_rows, output_ids, frequency, presence)


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
