"""The engine step on a tiny random model: batching invariance, stops, seeds, aborts, failures."""

from __future__ import annotations

import pytest

from loramux.scheduler.request import FinishReason
from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.offline import OfflineEngine, OfflineRequest
from tests.engine_fixtures import build_core
from tests.peft_adapters import AdapterRecipe, make_peft_adapter

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(tiny_chat_model, tmp_path_factory):
    directory, hf = tiny_chat_model
    out = tmp_path_factory.mktemp("adapters")
    return {
        "alpha": make_peft_adapter(hf, AdapterRecipe("alpha", r=8, seed=1, b_std=0.2), out),
        "beta": make_peft_adapter(hf, AdapterRecipe("beta", r=4, target_modules=["q_proj", "v_proj"], seed=2, b_std=0.3), out),
    }


@pytest.fixture()
def core(tiny_chat_model, smol_tokenizer, adapters):
    return build_core(tiny_chat_model[0], smol_tokenizer, adapters)


def prompt(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def run_alone(core, ids, params, adapter):
    return OfflineEngine(core).generate([OfflineRequest(ids, params, adapter)])[0]


def test_joining_and_leaving_mid_run_matches_running_alone(core, smol_tokenizer):
    plan = [  # (joins at step, prompt, adapter, max_tokens)
        (0, "The quick brown fox", "alpha", 12),
        (0, "Hello there, how are you doing today?", None, 5),
        (2, "Once upon a time", "beta", 9),
        (3, "One two three four five six seven eight nine ten", "alpha", 7),
        (6, "Why?", None, 10),
    ]
    outputs: dict[str, list[int]] = {}
    finished: set[str] = set()
    step = 0
    while len(finished) < len(plan):
        for i, (join, text, adapter, max_tokens) in enumerate(plan):
            if join == step:
                core.add_request(f"r{i}", prompt(smol_tokenizer, text), SamplingParams(max_tokens=max_tokens, **GREEDY), adapter)
                outputs[f"r{i}"] = []
        for out in core.step():
            outputs[out.request_id] += out.new_token_ids
            if out.finished:
                finished.add(out.request_id)
        step += 1
    for i, (_, text, adapter, max_tokens) in enumerate(plan):
        alone = run_alone(core, prompt(smol_tokenizer, text), SamplingParams(max_tokens=max_tokens, **GREEDY), adapter)
        assert outputs[f"r{i}"] == alone.token_ids, f"request {i} differs when batched"
        assert len(alone.token_ids) == max_tokens


def test_stream_concatenation_equals_full_decode(core, smol_tokenizer):
    engine = OfflineEngine(core)
    results = engine.generate(
        [OfflineRequest(prompt(smol_tokenizer, t), SamplingParams(max_tokens=24, **GREEDY), a)
         for t, a in [("日本語の文章", "alpha"), ("Emoji time 🙂🙂", None), ("Ça va très bien", "beta")]]
    )
    for result in results:
        assert result.text == smol_tokenizer.decode(result.token_ids, skip_special_tokens=True)


def find_split_stop(tokenizer, token_ids: list[int]) -> tuple[str, int]:
    """A stop string that spans a token boundary, and the token index where it starts."""
    for k in range(1, len(token_ids) - 1):
        left = tokenizer.decode(token_ids[: k + 1])
        before = tokenizer.decode(token_ids[:k])
        piece, nxt = left[len(before) :], tokenizer.decode(token_ids[: k + 2])[len(left) :]
        if len(piece) >= 2 and len(nxt) >= 2 and piece.isprintable() and nxt.isprintable():
            return piece[-2:] + nxt[:2], k
    pytest.skip("no token boundary with printable pieces in this output")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_split_across_tokens(core, smol_tokenizer, include):
    ids = prompt(smol_tokenizer, "The quick brown fox")
    free = run_alone(core, ids, SamplingParams(max_tokens=30, **GREEDY), "alpha")
    stop, _ = find_split_stop(smol_tokenizer, free.token_ids)
    streamed: list[str] = []
    core.add_request("s", ids, SamplingParams(max_tokens=30, stop=(stop,), include_stop_str_in_output=include, **GREEDY), "alpha")
    while core.has_unfinished_requests():
        for out in core.step():
            streamed.append(out.new_text)
            if out.finished:
                final = out
    text = "".join(streamed)
    cut = free.text.index(stop)
    assert text == free.text[: cut + (len(stop) if include else 0)]
    assert final.finish_reason is FinishReason.STOP and final.stop_reason == stop
    if not include:
        assert all(stop not in s for s in streamed)
    assert core.scheduler.kv_cache.num_free_blocks == core.scheduler.kv_cache.num_blocks


def test_seeded_sampling_is_the_same_alone_and_batched(core, smol_tokenizer):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    ids = prompt(smol_tokenizer, "Tell me a story")
    alone = run_alone(core, ids, params, "alpha")
    batch = OfflineEngine(core).generate(
        [
            OfflineRequest(prompt(smol_tokenizer, "Something else entirely"), SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True), None),
            OfflineRequest(ids, params, "alpha"),
            OfflineRequest(prompt(smol_tokenizer, "More"), SamplingParams(max_tokens=20, temperature=0.7, seed=7, ignore_eos=True), "beta"),
        ]
    )
    assert batch[1].token_ids == alone.token_ids
    other_seed = run_alone(core, ids, SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=99, ignore_eos=True), "alpha")
    assert other_seed.token_ids != alone.token_ids


def test_abort_mid_generation_frees_blocks_and_pin(core, smol_tokenizer):
    kv = core.scheduler.kv_cache
    free_before = kv.num_free_blocks
    core.add_request("long", prompt(smol_tokenizer, "Count to a hundred: 1, 2, 3"), SamplingParams(max_tokens=200, **GREEDY), "alpha")
    core.add_request("short", prompt(smol_tokenizer, "Hi"), SamplingParams(max_tokens=6, **GREEDY), "beta")
    for _ in range(4):
        core.step()
    assert kv.num_free_blocks < free_before
    [final] = core.abort(["long"])
    assert final.finished and final.finish_reason is FinishReason.ABORT
    while core.has_unfinished_requests():
        core.step()
    assert kv.num_free_blocks == free_before
    assert all(count == 0 for count in core.scheduler._residency.pins.values())


def test_failure_in_one_request_leaves_others_intact(core, smol_tokenizer, monkeypatch):
    expected = run_alone(core, prompt(smol_tokenizer, "Good morning"), SamplingParams(max_tokens=8, **GREEDY), "beta")
    sampler = core.runner.sampler
    original = sampler._generator

    def failing_generator(request):
        if request.request_id == "bad-sample":
            raise RuntimeError("injected sampler failure")
        return original(request)

    monkeypatch.setattr(sampler, "_generator", failing_generator)
    core.add_request("bad-sample", prompt(smol_tokenizer, "x"), SamplingParams(max_tokens=8, temperature=0.8), "alpha")
    core.add_request("good", prompt(smol_tokenizer, "Good morning"), SamplingParams(max_tokens=8, **GREEDY), "beta")
    core.add_request("bad-detok", prompt(smol_tokenizer, "y"), SamplingParams(max_tokens=8, **GREEDY), None)

    def broken(token_id):
        raise UnicodeError("injected detokenizer failure")

    monkeypatch.setattr(core._tracked["bad-detok"].detokenizer, "add_token", broken)
    results: dict[str, list] = {"bad-sample": [], "good": [], "bad-detok": []}
    while core.has_unfinished_requests():
        for out in core.step():
            results[out.request_id].append(out)
    assert results["bad-sample"][-1].finish_reason is FinishReason.ERROR
    assert "injected sampler failure" in results["bad-sample"][-1].error
    assert results["bad-detok"][-1].finish_reason is FinishReason.ERROR
    assert "injected detokenizer failure" in results["bad-detok"][-1].error
    good_tokens = [t for out in results["good"] for t in out.new_token_ids]
    assert good_tokens == expected.token_ids
    assert results["good"][-1].finish_reason is FinishReason.LENGTH
