"""The arithmetic of `make eval` / `loramux eval` (server/eval.py), no model needed."""

from __future__ import annotations

import math

import pytest

from loramux.clients.operations import _generate_result
from loramux.clients.types import Token
from loramux.server.eval import (
    EvalError,
    evaluate_over_api,
    perplexity,
    ppl_increase_pct,
    text_chunks,
    top1_agreement,
)


def test_perplexity_is_exp_of_mean_nll():
    assert perplexity([math.log(0.5)] * 4) == pytest.approx(2.0)
    assert perplexity([math.log(0.25), math.log(1.0)]) == pytest.approx(2.0)
    with pytest.raises(EvalError):
        perplexity([])


def test_increase_and_agreement():
    assert ppl_increase_pct(10.0, 10.1) == pytest.approx(1.0)
    assert ppl_increase_pct(10.0, 9.9) == pytest.approx(-1.0)
    assert top1_agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(EvalError):
        top1_agreement([1, 2], [1])


def test_chunks_respect_the_bound_and_keep_every_word():
    text = "alpha beta gamma.\n\n" + " ".join(f"w{i}" for i in range(300)) + "\n\n\nlast one"
    chunks = text_chunks(text, 100)
    assert all(0 < len(c) <= 100 for c in chunks)
    assert " ".join(" ".join(chunks).split()) == " ".join(text.split())
    assert text_chunks("x" * 250, 100) == ["x" * 100, "x" * 100, "x" * 50]  # a word longer than the bound
    assert text_chunks("one\n\ntwo", 100) == ["one\n\ntwo"]  # short paragraphs packed together
    assert text_chunks("  \n\n ", 100) == []


class FakeClient:
    """Answers /generate with a prefill whose logprobs are -1 per token after the first."""

    def __init__(self, with_prefill: bool = True) -> None:
        self.calls: list[tuple[str, str | None, dict]] = []
        self.with_prefill = with_prefill

    def generate(self, prompt, adapter_id=None, **params):
        self.calls.append((prompt, adapter_id, params))
        words = prompt.split()
        prefill = [{"id": 0, "text": words[0], "logprob": None}] + [
            {"id": i, "text": w, "logprob": -1.0} for i, w in enumerate(words[1:], 1)
        ]
        details = {"finish_reason": "length", "generated_tokens": 1, "prompt_tokens": len(words), "tokens": []}
        if self.with_prefill:
            details["prefill"] = prefill
        return _generate_result("x", details, None)


def test_evaluate_over_api_sums_prefill_logprobs_over_chunks():
    client = FakeClient()
    text = "a b c d\n\ne f g"
    result = evaluate_over_api(client, text, "pirate", max_chars=8)
    assert [c[0] for c in client.calls] == ["a b c d", "e f g"]
    assert all(c[1] == "pirate" and c[2] == {"max_new_tokens": 1, "decoder_input_details": True} for c in client.calls)
    assert (result.adapter, result.num_chunks, result.num_tokens) == ("pirate", 2, 5)  # first tokens unscored
    assert result.perplexity == pytest.approx(math.e)
    assert evaluate_over_api(FakeClient(), text, None).adapter == "base"


def test_evaluate_over_api_needs_prompt_logprobs():
    with pytest.raises(EvalError, match="prompt logprobs"):
        evaluate_over_api(FakeClient(with_prefill=False), "a b c", None)
    with pytest.raises(EvalError, match="empty"):
        evaluate_over_api(FakeClient(), " \n", None)


def test_client_parses_prefill():
    result = _generate_result("t", {"prefill": [{"id": 5, "text": "a", "logprob": None}, {"id": 6, "text": "b", "logprob": -0.5}]}, None)
    assert result.prefill == (Token(5, "a", None), Token(6, "b", -0.5))
    assert _generate_result("t", {"tokens": []}, None).prefill is None
