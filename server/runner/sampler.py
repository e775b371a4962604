"""Per-request sampling inside one batch: penalties, greedy or random draws, logprobs.

Each row has its own parameters. A request with a seed draws from its own generator, once
per step and over the whole vocabulary, so its tokens do not depend on what else is in the
batch. Logprobs are those of the model's distribution (before penalties and temperature).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loramux.scheduler.output import TokenLogprobs
from loramux.scheduler.request import Request
from loramux.scheduler.sampling_params import SamplingParams


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
        params = [r.sampling_params for r in requests]
        want_logprobs = [p.logprobs is not None for p in params]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
        logits = _apply_penalties(logits, requests)
        tokens = logits.argmax(dim=-1)  # [n]; greedy rows keep it
        for i, (request, p) in enumerate(zip(requests, params)):
            if not p.greedy:
                probs = _filtered_probs(logits[i], p)  # [vocab]
                noise = torch.empty_like(probs).exponential_(generator=self._generator(request))
                tokens[i] = (probs / noise).argmax()  # exponential race = a draw from probs
        token_list = tokens.tolist()
        logprobs = {}
        if raw_logprobs is not None:
            for i, request in enumerate(requests):
                if want_logprobs[i]:
                    logprobs[request.request_id] = token_logprobs(
                        raw_logprobs[i], token_list[i], params[i].logprobs or 0
                    )
        return token_list, logprobs


def token_logprobs(row: torch.Tensor, token_id: int, top: int) -> TokenLogprobs:
    """row: fp32 [vocab] logprobs."""
    chosen = row[token_id]
    rank = int((row > chosen).sum()) + 1
    top_pairs: tuple[tuple[int, float], ...] = ()
    if top > 0:
        values, ids = row.topk(top)
        top_pairs = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprobs(token_id=token_id, logprob=float(chosen), rank=rank, top=top_pairs)


def _apply_penalties(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    rows = [
        i
        for i, r in enumerate(requests)
        if r.sampling_params.repetition_penalty != 1.0
        or r.sampling_params.presence_penalty
        or r.sampling_params.frequency_penalty
    ]
    if not rows:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    for i in rows:
        request, p = requests[i], requests[i].sampling_params
        row = logits[i]
        if p.repetition_penalty != 1.0:
            # transformers' RepetitionPenaltyLogitsProcessor, over prompt and output.
            seen = torch.tensor(sorted(set(request.all_token_ids)), dtype=torch.int64, device=row.device)
            seen = seen[seen < vocab]
            values = row[seen]
            row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and request.output_token_ids:
            # OpenAI semantics, over the generated tokens only.
            ids = torch.tensor(request.output_token_ids, dtype=torch.int64, device=row.device)
            counts = torch.bincount(ids, minlength=vocab)[:vocab].to(row.dtype)
            row -= counts * p.frequency_penalty + (counts > 0).to(row.dtype) * p.presence_penalty
    return logits


def _filtered_probs(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p and typical-p filtering; returns probs [vocab]."""
    row = row / p.temperature
    if p.top_k and p.top_k < row.shape[-1]:
        kth = row.topk(p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = (sorted_probs.cumsum(-1) - sorted_probs) >= p.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.typical_p < 1.0:
        probs = _typical_filter(probs, p.typical_p)
    return probs / probs.sum()


def _typical_filter(probs: torch.Tensor, mass: float) -> torch.Tensor:
    """transformers' TypicalLogitsWarper: keep tokens closest to the entropy, up to `mass`."""
    logp = torch.log(probs.clamp_min(1e-30))
    entropy = -(probs * logp).nansum()
    surprise_gap = (-logp - entropy).abs()
    gaps, order = surprise_gap.sort()
    sorted_probs = probs[order]
    cumulative = sorted_probs.cumsum(-1)
    last = int((cumulative < mass).sum())  # keep through the token that crosses `mass`
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[order[: last + 1]] = True
    return probs.masked_fill(~keep, 0.0)
