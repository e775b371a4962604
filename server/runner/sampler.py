"""Per-request sampling inside one batch, on batch tensors: bias, penalties, greedy or
random draws, logprobs.

Each row has its own parameters, gathered once per step into `SamplingMetadata`; every
filter runs on all rows that use it at once. A request with a seed draws from its own
generator, once per step and over the whole vocabulary, so its tokens do not depend on
what else is in the batch. Logprobs are those of the model's distribution (before logit
bias, penalties and temperature).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loramux.scheduler.output import TokenLogprobs
from loramux.scheduler.request import Request
from loramux.server.runner.sampling_metadata import Filters, Penalties, SamplingMetadata, build_sampling_metadata


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self._default_generator = torch.Generator(device=device)
        self._default_generator.manual_seed(seed)
        self._generators: dict[str, torch.Generator] = {}  # request_id -> seeded generator

    def forget(self, request_ids: Sequence[str]) -> None:
        for request_id in request_ids:
            self._generators.pop(request_id, None)

    def _generator(self, request: Request) -> torch.Generator:
        seed = request.sampling_params.seed
        if seed is None:
            return self._default_generator
        generator = self._generators.get(request.request_id)
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
            self._generators[request.request_id] = generator
        return generator

    def sample(
        self, logits: torch.Tensor, requests: Sequence[Request]
    ) -> tuple[list[int], dict[str, TokenLogprobs]]:
        """logits: fp32 [n, vocab], row i belongs to requests[i]. Returns a token per row."""
        meta = build_sampling_metadata(requests, logits.shape[-1], logits.device)
        raw_logprobs = None
        if meta.logprob_rows:
            rows = torch.tensor(meta.logprob_rows, dtype=torch.int64, device=logits.device)
            raw_logprobs = torch.log_softmax(logits[rows], dim=-1)  # [num_logprob_rows, vocab]
        logits = _adjusted_logits(logits, meta)
        tokens = logits.argmax(dim=-1)  # [n]; greedy rows keep it
        if meta.filters is not None:
            probs = filtered_probs(logits[meta.filters.rows], meta.filters)  # [m, vocab]
            noise = torch.empty_like(probs)
            for j, i in enumerate(meta.random_indices):
                noise[j].exponential_(generator=self._generator(requests[i]))
            tokens[meta.filters.rows] = (probs / noise).argmax(dim=-1)  # exponential race = a draw
        token_list = tokens.tolist()
        logprobs: dict[str, TokenLogprobs] = {}
        if raw_logprobs is not None:
            chosen = [token_list[i] for i in meta.logprob_rows]
            entries = batch_token_logprobs(raw_logprobs, chosen, meta.logprob_tops)
            logprobs = {requests[i].request_id: e for i, e in zip(meta.logprob_rows, entries)}
        return token_list, logprobs


def batch_token_logprobs(logprobs: torch.Tensor, token_ids: Sequence[int], tops: Sequence[int]) -> list[TokenLogprobs]:
    """logprobs: fp32 [m, vocab]; row j scores token_ids[j] and lists its tops[j] best."""
    if not token_ids:
        return []
    ids = torch.tensor(token_ids, dtype=torch.int64, device=logprobs.device).unsqueeze(1)  # [m, 1]
    chosen = logprobs.gather(1, ids)  # [m, 1]
    ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
    k = max(tops)
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], ids[:, :0])
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return [
        TokenLogprobs(token_id=t, logprob=c, rank=r, top=tuple(zip(i[:top], v[:top])))
        for t, c, r, i, v, top in zip(token_ids, chosen.squeeze(1).tolist(), ranks, top_ids, top_values, tops)
    ]


def _adjusted_logits(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Logit bias, then penalties; a copy where anything changes. [n, vocab]"""
    if meta.logit_bias is None and meta.penalties is None:
        return logits
    logits = logits.clone()
    if meta.logit_bias is not None:
        bias = meta.logit_bias
        logits.index_put_((bias.rows, bias.token_ids), bias.values, accumulate=True)
    if meta.penalties is not None:
        _penalize(logits, meta.penalties)
    return logits


def _penalize(logits: torch.Tensor, p: Penalties) -> None:
    """In place on logits [n, vocab]: HF's repetition penalty on seen tokens, then OpenAI's
    frequency (per occurrence) and presence (once) penalties on generated ones. A pair that
    occurs twice writes the same value twice, so duplicates need no dedup."""
    if p.seen_ids.numel():
        seen = (p.seen_rows, p.seen_ids)
        values = logits[seen]
        logits.index_put_(seen, torch.where(values > 0, values / p.seen_penalty, values * p.seen_penalty))
    if p.output_ids.numel():
        out = (p.output_rows, p.output_ids)
        logits.index_put_(out, -p.frequency, accumulate=True)
        logits.index_put_(out, logits[out] - p.presence)


def filtered_probs(logits: torch.Tensor, f: Filters) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p and typical-p filtering.

    logits: fp32 [m, vocab]; returns unnormalized probs [m, vocab] (zero = filtered out).
    """
    logits = logits / f.temperature
    if f.top_k is None and f.top_p is None and f.min_p is None:
        probs = torch.softmax(logits, dim=-1)
    else:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [m, vocab]
        if f.top_k is not None:
            # Ties with the k-th logit stay, as with a plain `logits < kth` mask.
            kth = sorted_logits.gather(1, f.top_k - 1)  # [m, 1]
            sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        if f.top_p is not None:
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            # Rows with top_p = 1 keep everything (a rounded cumsum may reach 1 early).
            outside = ((sorted_probs.cumsum(dim=-1) - sorted_probs) >= f.top_p) & (f.top_p < 1.0)
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        if f.min_p is not None:
            sorted_probs = sorted_probs.masked_fill(sorted_probs < f.min_p * sorted_probs[:, :1], 0.0)
        probs = torch.zeros_like(sorted_probs).scatter_(1, order, sorted_probs)
    if f.typical_rows is not None:
        probs[f.typical_rows] = _typical(probs[f.typical_rows], f.typical_p)
    return probs


def _typical(probs: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """transformers' TypicalLogitsWarper on probs [t, vocab]: keep the tokens whose surprise
    is closest to the entropy, through the one whose cumulative mass crosses `mass` [t, 1]."""
    probs = probs / probs.sum(dim=-1, keepdim=True)
    logp = torch.log(probs.clamp_min(1e-30))
    entropy = -(probs * logp).sum(dim=-1, keepdim=True)  # [t, 1]
    _, order = (-logp - entropy).abs().sort(dim=-1)
    cumulative = probs.gather(1, order).cumsum(dim=-1)  # [t, vocab]
    last = (cumulative < mass).sum(dim=-1, keepdim=True)  # [t, 1] position of the crossing token
    positions = torch.arange(probs.shape[-1], device=probs.device).unsqueeze(0)
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, order, positions <= last)
    return probs.masked_fill(~keep, 0.0)
