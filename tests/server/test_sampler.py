"""The batched sampler: each filter against transformers' logits processors, every row as
if it were sampled alone, logit bias, penalties and logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from loramux.scheduler.request import Request
from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.runner.sampler import Sampler
from loramux.server.runner.sampling_metadata import build_sampling_metadata
from loramux.server.runner import sampler as sampler_module

VOCAB = 64


def request(name: str, prompt=(1, 2, 3), output=(), **params) -> Request:
    r = Request(name, list(prompt), SamplingParams(**params))
    for token in output:
        r.append_output(token)
    return r


def logits_rows(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, VOCAB, generator=generator) * 3.0  # [n, vocab] fp32


def reference_support(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The tokens transformers' warpers keep for one row (its generate() order)."""
    scores = row.unsqueeze(0)
    warpers = [TemperatureLogitsWarper(params.temperature)]
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    if params.min_p > 0.0:
        warpers.append(MinPLogitsWarper(params.min_p))
    if params.typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(params.typical_p))
    for warper in warpers:
        scores = warper(torch.zeros(1, 1, dtype=torch.long), scores)
    return torch.isfinite(scores[0])


FILTER_CASES = [
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=5),
    dict(temperature=1.0, top_p=0.6),
    dict(temperature=0.9, min_p=0.2),
    dict(temperature=1.0, typical_p=0.5),
    dict(temperature=0.8, top_k=20, top_p=0.9),
    dict(temperature=1.1, top_k=12, min_p=0.05),
]


def test_filters_keep_what_transformers_keeps_for_every_row_of_one_batch():
    logits = logits_rows(len(FILTER_CASES))
    requests = [request(f"r{i}", **case) for i, case in enumerate(FILTER_CASES)]
    meta = build_sampling_metadata(requests, VOCAB, torch.device("cpu"))
    probs = sampler_module.filtered_probs(logits, meta.filters)  # every row random here
    for i, case in enumerate(FILTER_CASES):
        expected = reference_support(logits[i], requests[i].sampling_params)
        assert torch.equal(probs[i] > 0, expected), case
        assert (probs[i] > 0).sum() >= 1


def test_kept_probabilities_follow_the_tempered_softmax():
    logits = logits_rows(1, seed=3)
    r = request("a", temperature=0.5, top_k=8)
    meta = build_sampling_metadata([r], VOCAB, torch.device("cpu"))
    probs = sampler_module.filtered_probs(logits, meta.filters)[0]
    kept = probs > 0
    expected = torch.softmax(logits[0] / 0.5, dim=-1)[kept]
    torch.testing.assert_close(probs[kept] / probs[kept].sum(), expected / expected.sum())


def test_each_seeded_row_draws_the_same_token_alone_and_in_any_batch():
    cases = [dict(temperature=0.0), *FILTER_CASES, dict(temperature=1.0, repetition_penalty=1.3)]
    logits = logits_rows(len(cases), seed=5)
    alone = []
    for i, case in enumerate(cases):
        tokens, _ = Sampler(torch.device("cpu")).sample(logits[i : i + 1], [request(f"r{i}", seed=100 + i, **case)])
        alone.append(tokens[0])
    for order in (list(range(len(cases))), list(reversed(range(len(cases))))):
        batch = [request(f"r{i}", seed=100 + i, **cases[i]) for i in order]
        tokens, _ = Sampler(torch.device("cpu")).sample(logits[order], batch)
        assert tokens == [alone[i] for i in order]


def test_seeded_draws_follow_the_distribution():
    """A random row with a seed is a draw from its filtered distribution, not an argmax."""
    logits = torch.full((1, VOCAB), -10.0)
    logits[0, :4] = torch.tensor([2.0, 1.0, 0.0, -1.0])
    seen = set()
    sampler = Sampler(torch.device("cpu"))
    r = request("many", temperature=1.0, top_k=4, seed=7)
    for _ in range(200):
        seen.add(sampler.sample(logits, [r])[0][0])
    assert seen == {0, 1, 2, 3}


def test_repetition_penalty_matches_transformers_and_openai_penalties_count_outputs():
    logits = logits_rows(3, seed=9)
    prompt, output = (4, 5, 6), (7, 7, 8)
    rows = [
        request("rep", prompt, output, temperature=0.0, repetition_penalty=1.7),
        request("freq", prompt, output, temperature=0.0, frequency_penalty=1.5, presence_penalty=0.5),
        request("plain", prompt, output, temperature=0.0),
    ]
    meta = build_sampling_metadata(rows, VOCAB, torch.device("cpu"))
    adjusted = sampler_module._adjusted_logits(logits, meta)
    ids = torch.tensor([list(prompt) + list(output)])
    torch.testing.assert_close(adjusted[0], RepetitionPenaltyLogitsProcessor(1.7)(ids, logits[0:1].clone())[0])
    expected = logits[1].clone()
    expected[7] -= 2 * 1.5 + 0.5
    expected[8] -= 1 * 1.5 + 0.5
    torch.testing.assert_close(adjusted[1], expected)
    torch.testing.assert_close(adjusted[2], logits[2])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logit_bias_forces_and_bans_tokens_per_row(temperature):
    logits = logits_rows(3, seed=11)
    best = int(logits[1].argmax())
    rows = [
        request("force", temperature=temperature, seed=1, logit_bias=((17, 100.0),)),
        request("ban", temperature=0.0, logit_bias=((best, -100.0),)),
        request("none", temperature=0.0),
    ]
    tokens, _ = Sampler(torch.device("cpu")).sample(logits, rows)
    assert tokens[0] == 17
    assert tokens[1] != best
    assert tokens[2] == int(logits[2].argmax())


def test_logprobs_are_the_models_and_rank_the_chosen_token():
    logits = logits_rows(2, seed=13)
    rows = [request("a", temperature=0.0, logprobs=3, logit_bias=((5, 50.0),)), request("b", temperature=0.0)]
    tokens, logprobs = Sampler(torch.device("cpu")).sample(logits, rows)
    assert set(logprobs) == {"a"}
    raw = torch.log_softmax(logits[0], dim=-1)
    entry = logprobs["a"]
    assert tokens[0] == 5 and entry.token_id == 5
    assert math.isclose(entry.logprob, float(raw[5]), rel_tol=1e-6)
    assert entry.rank == int((raw > raw[5]).sum()) + 1
    values, ids = raw.topk(3)
    assert [i for i, _ in entry.top] == ids.tolist()
    assert [v for _, v in entry.top] == pytest.approx(values.tolist())


def test_greedy_batches_build_no_filters():
    rows = [request("a", temperature=0.0), request("b", temperature=0.0)]
    meta = build_sampling_metadata(rows, VOCAB, torch.device("cpu"))
    assert meta.filters is None and meta.penalties is None and meta.logit_bias is None


def test_one_softmax_and_one_sort_per_step_however_many_rows(monkeypatch):
    """Filters run on the batch: the number of softmax/sort calls does not grow with rows."""
    calls = {"softmax": 0, "sort": 0}
    softmax, sort = torch.softmax, torch.Tensor.sort

    def counting_softmax(*args, **kwargs):
        calls["softmax"] += 1
        return softmax(*args, **kwargs)

    def counting_sort(self, *args, **kwargs):
        calls["sort"] += 1
        return sort(self, *args, **kwargs)

    monkeypatch.setattr(torch, "softmax", counting_softmax)
    monkeypatch.setattr(torch.Tensor, "sort", counting_sort)
    rows = [request(f"r{i}", seed=i, temperature=0.5 + i / 10, top_k=3 + i, top_p=0.9) for i in range(12)]
    tokens, _ = Sampler(torch.device("cpu")).sample(logits_rows(len(rows)), rows)
    assert len(tokens) == 12
    assert calls == {"softmax": 1, "sort": 1}
