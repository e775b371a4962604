"""The OpenAI-compatible API through the `openai` package against a real tiny-model server.

Every greedy output is checked against the offline engine's greedy output for the same
prompt and adapter (tests/e2e/conftest.py: Reference), so a request routed to the wrong
adapter, a token lost in streaming or cross-talk in a mixed batch shows up as a mismatch.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.e2e.conftest import API_KEY, TINY_NAME

MESSAGES = [{"role": "user", "content": "Name three colors."}]
PROMPT = "The quick brown fox"
MODELS = [TINY_NAME, "alpha", "beta"]
MAX_TOKENS = 10


def adapter_of(model: str) -> str | None:
    return None if model == TINY_NAME else model


@pytest.fixture(scope="module")
def client(tiny_server):
    with openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def expected(tiny_reference):
    """(endpoint, model) -> the offline engine's greedy output."""
    chat_ids = tiny_reference.chat_ids(MESSAGES)
    prompt_ids = tiny_reference.prompt_ids(PROMPT)
    keys, requests = [], []
    for model in MODELS:
        for endpoint, ids in (("chat", chat_ids), ("completions", prompt_ids)):
            keys.append((endpoint, model))
            requests.append((ids, adapter_of(model), {"max_tokens": MAX_TOKENS, "temperature": 0.0}))
    results = dict(zip(keys, tiny_reference.run(requests)))
    for endpoint in ("chat", "completions"):  # the adapters must change the output, or the check is void
        texts = [results[endpoint, m].text for m in MODELS]
        assert len(set(texts)) == len(MODELS), texts
    return results


def test_concurrent_base_and_two_adapters_match_offline_greedy(tiny_server, expected):
    """chat + completions, streamed and not, base + alpha + beta: 12 requests in flight at once."""

    async def chat(c: openai.AsyncOpenAI, model: str, stream: bool) -> tuple[str, str]:
        if not stream:
            r = await c.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
            assert r.model == model and r.usage.completion_tokens == MAX_TOKENS
            return r.choices[0].message.content, r.choices[0].finish_reason
        text, finish = "", None
        async for chunk in await c.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, stream=True
        ):
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        return text, finish

    async def complete(c: openai.AsyncOpenAI, model: str, stream: bool) -> tuple[str, str]:
        if not stream:
            r = await c.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
            return r.choices[0].text, r.choices[0].finish_reason
        text, finish = "", None
        async for chunk in await c.completions.create(
            model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True
        ):
            for choice in chunk.choices:
                text += choice.text
                finish = choice.finish_reason or finish
        return text, finish

    async def scenario():
        async with openai.AsyncOpenAI(base_url=f"{tiny_server.url}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=60) as c:
            jobs, keys = [], []
            for model in MODELS:
                for stream in (False, True):
                    keys += [("chat", model, stream), ("completions", model, stream)]
                    jobs += [chat(c, model, stream), complete(c, model, stream)]
            return dict(zip(keys, await asyncio.gather(*jobs)))

    results = asyncio.run(scenario())
    for (endpoint, model, stream), (text, finish) in results.items():
        assert text == expected[endpoint, model].text, (endpoint, model, stream)
        assert finish == "length", (endpoint, model, stream)


def test_stream_include_usage_ends_with_usage_then_done(tiny_server, expected):
    body = {"model": "alpha", "messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    events = []
    with tiny_server.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    *body_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == []
    prompt_tokens = usage_chunk["usage"]["prompt_tokens"]
    assert usage_chunk["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": MAX_TOKENS,
                                    "total_tokens": prompt_tokens + MAX_TOKENS}
    assert prompt_tokens == expected["chat", "alpha"].num_prompt_tokens > 0
    assert all(chunk["usage"] is None for chunk in body_chunks)
    assert body_chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in body_chunks)
    assert text == expected["chat", "alpha"].text


def test_openai_package_usage_chunk(client, expected):
    stream = client.completions.create(model="beta", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX_TOKENS
    assert "".join(ch.choices[0].text for ch in chunks[:-1] if ch.choices) == expected["completions", "beta"].text


def test_chat_logprobs_and_top_logprobs(client, tiny_reference, tokenizer):
    ids = tiny_reference.chat_ids(MESSAGES)
    ref = tiny_reference.greedy(ids, "alpha", 6, logprobs=3)
    r = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 6 == len(ref.logprobs)
    for entry, want in zip(content, ref.logprobs):
        assert entry.token == tokenizer.decode([want.token_id])
        assert entry.logprob == pytest.approx(want.logprob, abs=1e-3)
        assert entry.logprob <= 0.0
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the best
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
    # Streamed, the same entries arrive spread over the chunks.
    streamed = []
    for chunk in client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=6, temperature=0,
                                                logprobs=True, top_logprobs=3, stream=True):
        for choice in chunk.choices:
            if choice.logprobs and choice.logprobs.content:
                streamed += choice.logprobs.content
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)


def test_completions_logprobs_with_echo(client, tiny_reference, tokenizer):
    ids = tiny_reference.prompt_ids(PROMPT)
    ref = tiny_reference.greedy(ids, "beta", 4, logprobs=2, prompt_logprobs=2)
    r = client.completions.create(model="beta", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, echo=True)
    choice = r.choices[0]
    assert choice.text == tokenizer.decode(ids) + ref.text
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    assert all(isinstance(v, float) and v <= 0.0 for v in lp.token_logprobs[1:])
    want = [p.logprob for p in ref.prompt_logprobs] + [p.logprob for p in ref.logprobs]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-3)
    assert lp.tokens == [tokenizer.decode([t]) for t in ids + ref.token_ids]
    assert all(len(top) <= 3 for top in lp.top_logprobs[1:])  # top-2 plus the chosen token
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_n_with_seed_is_reproducible_and_matches_engine(client, tiny_reference):
    ids = tiny_reference.prompt_ids(PROMPT)
    refs = tiny_reference.run([
        (ids, "alpha", {"max_tokens": 8, "temperature": 1.0, "seed": 1234 + j}) for j in range(2)
    ])
    runs = [
        client.completions.create(model="alpha", prompt=PROMPT, max_tokens=8, temperature=1.0, n=2, seed=1234)
        for _ in range(2)
    ]
    for r in runs:
        assert [c.index for c in r.choices] == [0, 1]
        assert [c.text for c in r.choices] == [ref.text for ref in refs]
        assert r.usage.completion_tokens == 16
    assert refs[0].text != refs[1].text  # distinct seeds per choice
    chat = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=8, temperature=1.0, n=2,
                                          seed=7)
    assert len(chat.choices) == 2 and chat.choices[0].message.content != chat.choices[1].message.content


def test_stop_string(client, tiny_reference):
    ids = tiny_reference.prompt_ids(PROMPT)
    full = tiny_reference.greedy(ids, None, 16).text
    middle = len(full) // 2
    stop = full[middle:middle + 3]
    want = full[: full.index(stop)]
    assert tiny_reference.greedy(ids, None, 16, stop=(stop,)).text == want
    r = client.completions.create(model=TINY_NAME, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == want
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop
    streamed = "".join(
        ch.choices[0].text
        for ch in client.completions.create(model=TINY_NAME, prompt=PROMPT, max_tokens=16, temperature=0,
                                            stop=stop, stream=True)
        if ch.choices
    )
    assert streamed == want


def test_models_lists_base_and_adapters(client):
    models = {m.id: m for m in client.models.list().data}
    assert {TINY_NAME, "alpha", "beta"} <= set(models)
    assert models[TINY_NAME].model_extra["parent"] is None
    for name in ("alpha", "beta"):
        assert models[name].model_extra["parent"] == TINY_NAME
        assert models[name].model_extra["root"] == name
        assert models[name].model_extra["max_model_len"] == 1024


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": "no-such-adapter", "messages": MESSAGES, "max_tokens": 2}),
    ("/v1/completions", {"model": "no-such-adapter", "prompt": PROMPT, "max_tokens": 2}),
    ("/v1/completions", {"model": "../etc", "prompt": PROMPT, "max_tokens": 2}),
])
def test_unknown_model_is_404_in_vllm_shape(tiny_server, client, path, body):
    with tiny_server.client() as c:
        r = c.post(path, json=body)
    assert r.status_code == 404
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == 404 and error["type"] == "NotFoundError" and error["param"] == "model"
    assert body["model"] in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=body["model"], prompt=PROMPT, max_tokens=2)


def test_bad_request_is_400_in_vllm_shape(tiny_server, client):
    with tiny_server.client() as c:
        r = c.post("/v1/completions", json={"model": TINY_NAME, "prompt": PROMPT, "max_tokens": 5000})
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["type"] == "BadRequestError" and error["param"] == "max_tokens" and error["code"] == 400
        r = c.post("/v1/chat/completions", json={"model": TINY_NAME, "messages": []})
        assert r.status_code == 400 and r.json()["error"]["code"] == 400
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=TINY_NAME, messages=MESSAGES, max_tokens=2, temperature=-1)
    assert httpx.get(f"{tiny_server.url}/health").status_code == 200
