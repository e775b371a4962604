"""Every field of every request model either does what it is documented to do or is refused.

The fields are discovered from the routes' pydantic body models (and the models nested in
them), so a field added without a case here fails `test_every_field_has_a_case`. Each case
runs against the shared tiny-model server: it sends a request with the field and one
without (or with another value) and checks the documented difference, or checks the 4xx
that names the field. Unknown fields are refused the same way.
"""

from __future__ import annotations

import asyncio
import json
import typing
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import pytest
from pydantic import BaseModel

from loramux.scheduler.request import FinishReason
from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.api import openai as openai_api
from loramux.server.api import tgi as tgi_api
from loramux.server.cli import build_parser
from loramux.server.offline import OfflineEngine, OfflineRequest
from loramux.server.serve import config_from_args
from loramux.server.service import GenerationService
from loramux.server.structured.tools import render_history
from tests.e2e.conftest import TINY_NAME

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Name three colors."}]
MAX_TOKENS = 6
FORCED = 1234  # a token id the tests force with logit_bias
# On the tiny model this question's greedy answer enters a loop of 2 tokens: with
# repetition_window 6 the guard cuts it after LOOP_CUT tokens (and finds no 1-token loop).
LOOP_MESSAGE = "What is 2+2?"
LOOP_TOKENS = 30
LOOP_CUT = 26
CONCURRENT_CASES = 16


# --------------------------------------------------------------------------- discovery


def _nested_models(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found += _nested_models(arg)
    return found


def request_models() -> list[type[BaseModel]]:
    """The body models of the generation routes, and every model nested in them."""
    roots = []
    for router in (openai_api.router, tgi_api.router):
        for route in router.routes:
            for param in getattr(getattr(route, "dependant", None), "body_params", ()):
                roots += _nested_models(param.field_info.annotation)
    seen: list[type[BaseModel]] = []
    while roots:
        model = roots.pop()
        if model in seen:
            continue
        seen.append(model)
        for info in model.model_fields.values():
            roots += _nested_models(info.annotation)
    return seen


def all_fields() -> list[str]:
    return sorted(f"{model.__name__}.{name}" for model in request_models() for name in model.model_fields)


# --------------------------------------------------------------------------- requests


class Api:
    def __init__(self, client: httpx.Client, loop_text: str) -> None:
        self.client = client
        self.loop_text = loop_text  # a prompt whose greedy text settles into a loop of period 2
        self._baselines: dict[str, object] = {}

    def baseline(self, route: str) -> str:
        """The greedy text of the plain request (asked once: every case compares with it)."""
        if route not in self._baselines:
            self._baselines[route] = self.openai_text(route) if route != "generate" else _gen_text(self)
        return self._baselines[route]

    def post(self, route: str, body: dict, status: int = 200) -> httpx.Response:
        response = self.client.post(route, json=body)
        assert response.status_code == status, (route, body, response.status_code, response.text)
        return response

    # OpenAI routes: "chat" or "completions"
    def openai(self, route: str, status: int = 200, **fields) -> dict:
        body = {"model": TINY_NAME, "max_tokens": MAX_TOKENS, "temperature": 0.0, **fields}
        if route == "chat":
            body.setdefault("messages", MESSAGES)
        else:
            body.setdefault("prompt", PROMPT)
        return self.post(f"/v1/{'chat/completions' if route == 'chat' else 'completions'}", body, status).json()

    def openai_text(self, route: str, **fields) -> str:
        choice = self.openai(route, **fields)["choices"][0]
        return choice["message"]["content"] if route == "chat" else choice["text"]

    def openai_refused(self, route: str, field: str, **fields) -> None:
        error = self.openai(route, status=400, **fields)["error"]
        assert error["param"] == field or field in error["message"], error

    # LoRAX / TGI route
    def generate(self, status: int = 200, inputs: str = PROMPT, **parameters) -> dict:
        body = {"inputs": inputs, "parameters": {"max_new_tokens": MAX_TOKENS, "details": True, **parameters}}
        return self.post("/generate", body, status).json()

    def generate_refused(self, field: str, **parameters) -> None:
        error = self.generate(status=422, **parameters)
        assert field in error["error"], error


Case = Callable[[Api, "Offline"], None]


class Offline:
    """A GenerationService over the tests' offline engine parts: what a route builds from a
    body, for the one case the tiny model cannot show over HTTP."""

    def __init__(self, parts) -> None:
        self.service = GenerationService(parts, engine=None, metrics=None)


# --------------------------------------------------------------------------- OpenAI cases

SAMPLED = {"temperature": 1.0}


def _model(api: Api, route: str) -> None:
    assert api.openai_text(route, model="alpha") != api.baseline(route)


def _temperature(api: Api, route: str) -> None:
    greedy = api.baseline(route)
    assert {api.openai_text(route, temperature=1.5, seed=s) for s in range(2)} != {greedy}


def _same_as_greedy_when_it_keeps_one(field: str, value) -> Case:
    """A filter that keeps only the most likely token turns sampling into greedy."""

    def case(api: Api, route: str) -> None:
        greedy = api.baseline(route)
        sampled = [api.openai_text(route, seed=s, **SAMPLED) for s in range(2)]
        assert any(text != greedy for text in sampled)  # sampling alone differs...
        assert all(api.openai_text(route, seed=s, **SAMPLED, **{field: value}) == greedy for s in range(2))

    return case


def _typical_p(api: Api, route: str) -> None:
    """Same seed, same noise: a narrow typical set changes the draw; typical_p 1 is off."""
    for seed in range(2):
        plain = api.openai_text(route, seed=seed, **SAMPLED)
        assert api.openai_text(route, seed=seed, typical_p=1.0, **SAMPLED) == plain
        assert api.openai_text(route, seed=seed, typical_p=1e-6, **SAMPLED) != plain


def _n(api: Api, route: str) -> None:
    assert len(api.openai(route, n=3)["choices"]) == 3


def _stop_string(text: str) -> str:
    """Three characters from the middle of a text: a stop string it reaches half-way."""
    return text[len(text) // 2 :][:3]


def _stop(api: Api, route: str) -> None:
    text = api.openai_text(route, max_tokens=12)
    cut = _stop_string(text)
    choice = api.openai(route, max_tokens=12, stop=[cut])["choices"][0]
    content = choice["message"]["content"] if route == "chat" else choice["text"]
    assert content == text[: text.index(cut)] and choice["finish_reason"] == "stop"


def _include_stop_str(api: Api, route: str) -> None:
    text = api.openai_text(route, max_tokens=12)
    cut = _stop_string(text)
    kept = api.openai_text(route, max_tokens=12, stop=[cut], include_stop_str_in_output=True)
    assert kept == text[: text.index(cut) + len(cut)]


def _seed(api: Api, route: str) -> None:
    first, again = (api.openai_text(route, seed=7, **SAMPLED) for _ in range(2))
    others = {api.openai_text(route, seed=s, **SAMPLED) for s in (8, 9, 10)}
    assert first == again and others != {first}


def _penalty(field: str, value: float) -> Case:
    """Greedy text that repeats itself changes under the penalty."""

    def case(api: Api, route: str) -> None:
        assert api.openai_text(route, max_tokens=16) != api.openai_text(route, max_tokens=16, **{field: value})

    return case


def _forced(**more) -> dict:
    return {"logit_bias": {str(FORCED): 100}, **more}


def _logit_bias(api: Api, route: str) -> None:
    forced = api.openai(route, logprobs=True if route == "chat" else 1, **_forced())
    choice = forced["choices"][0]
    if route == "chat":
        ids = [entry["token"] for entry in choice["logprobs"]["content"]]
        assert len(set(ids)) == 1 and forced["usage"]["completion_tokens"] == MAX_TOKENS
    else:
        assert len(set(choice["logprobs"]["tokens"])) == 1
    banned_text = api.baseline(route)
    assert api.openai_text(route, logit_bias={str(FORCED): -100}) == banned_text  # FORCED was never chosen
    api.openai_refused(route, "logit_bias", logit_bias={"not-a-token": 1})
    api.openai_refused(route, "logit_bias", logit_bias={str(FORCED): 101})


def _ignore_eos(api: Api, route: str, eos_id: int) -> None:
    stopped = api.openai(route, logit_bias={str(eos_id): 100})
    assert stopped["usage"]["completion_tokens"] == 1 and stopped["choices"][0]["finish_reason"] == "stop"
    running = api.openai(route, logit_bias={str(eos_id): 100}, ignore_eos=True)
    assert running["usage"]["completion_tokens"] == MAX_TOKENS
    assert running["choices"][0]["finish_reason"] == "length"


def _min_tokens(api: Api, route: str, eos_id: int) -> None:
    held = api.openai(route, logit_bias={str(eos_id): 100}, min_tokens=3)
    assert held["usage"]["completion_tokens"] == 4 and held["choices"][0]["finish_reason"] == "stop"


def _stop_token_ids(api: Api, route: str) -> None:
    free = api.openai(route, **_forced())
    assert free["usage"]["completion_tokens"] == MAX_TOKENS
    cut = api.openai(route, stop_token_ids=[FORCED], **_forced())
    assert cut["usage"]["completion_tokens"] == 1 and cut["choices"][0]["finish_reason"] == "stop"


def _skip_special_tokens(api: Api, route: str, eos_id: int, eos_text: str) -> None:
    fields = {"logit_bias": {str(eos_id): 100}, "ignore_eos": True, "max_tokens": 2}
    assert eos_text not in api.openai_text(route, **fields)
    assert eos_text in api.openai_text(route, skip_special_tokens=False, **fields)


def _stream(api: Api, route: str) -> None:
    text = api.baseline(route)
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    body = {"model": TINY_NAME, "max_tokens": MAX_TOKENS, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    body.update({"messages": MESSAGES} if route == "chat" else {"prompt": PROMPT})
    streamed, usage = "", None
    with api.client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                streamed += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
    assert streamed == text and usage["completion_tokens"] == MAX_TOKENS


def _user(api: Api, route: str) -> None:
    """Documented as the end user's id for the operator: it never changes the output."""
    assert api.openai_text(route, user="someone") == api.baseline(route)


def _adapter_scale(api: Api, route: str) -> None:
    base = api.baseline(route)
    alpha = api.openai_text(route, model="alpha")
    assert api.openai_text(route, model="alpha", adapter_scale=0.0) == base
    assert api.openai_text(route, model="alpha", adapter_scale=1.0) == alpha
    assert api.openai_text(route, model="alpha", adapter_scale=2.0) not in (base, alpha)
    api.openai_refused(route, "adapter_scale", adapter_scale=0.5)  # the base model has no delta to scale
    api.openai_refused(route, "adapter_scale", model="alpha", adapter_scale=-1.0)


def _repetition_window(api: Api, route: str) -> None:
    free = api.openai(route, **_forced(max_tokens=12))
    assert free["usage"]["completion_tokens"] == 12
    cut = api.openai(route, **_forced(max_tokens=12, repetition_window=4))
    assert cut["usage"]["completion_tokens"] == 4
    assert cut["choices"][0]["finish_reason"] == "length" and cut["choices"][0]["stop_reason"] == "repetition"
    api.openai_refused(route, "repetition_window", repetition_window=-1)


def _repetition_max_period(api: Api, route: str) -> None:
    """The loop prompt's greedy text repeats a 2-token loop from token 20 on (none of 1)."""
    looping = {"messages": [{"role": "user", "content": LOOP_MESSAGE}]} if route == "chat" else {"prompt": api.loop_text}
    free = api.openai(route, max_tokens=LOOP_TOKENS, repetition_window=6, repetition_max_period=1, **looping)
    assert free["usage"]["completion_tokens"] == LOOP_TOKENS  # no loop of 1 token that long
    cut = api.openai(route, max_tokens=LOOP_TOKENS, repetition_window=6, repetition_max_period=2, **looping)
    assert cut["usage"]["completion_tokens"] == LOOP_CUT and cut["choices"][0]["stop_reason"] == "repetition"
    assert cut["choices"][0]["finish_reason"] == "length"


def _max_tokens(route: str, field: str) -> Case:
    def case(api: Api) -> None:
        body = {"max_tokens": None, field: 3} if field != "max_tokens" else {field: 3}
        assert api.openai(route, **body)["usage"]["completion_tokens"] == 3

    return case


def shared_cases(route: str, tokens: dict) -> dict[str, Callable[[Api], None]]:
    """SamplingFields, for one route."""
    eos_id, eos_text = tokens["eos_id"], tokens["eos_text"]
    cases: dict[str, Callable] = {
        "model": _model,
        "temperature": _temperature,
        "top_p": _same_as_greedy_when_it_keeps_one("top_p", 1e-6),
        "top_k": _same_as_greedy_when_it_keeps_one("top_k", 1),
        "min_p": _same_as_greedy_when_it_keeps_one("min_p", 1.0),
        "typical_p": _typical_p,
        "n": _n,
        "stop": _stop,
        "seed": _seed,
        "presence_penalty": _penalty("presence_penalty", 2.0),
        "frequency_penalty": _penalty("frequency_penalty", 2.0),
        "repetition_penalty": _penalty("repetition_penalty", 3.0),
        "stream": _stream,
        "stream_options": _stream,
        "user": _user,
        "ignore_eos": lambda api, r: _ignore_eos(api, r, eos_id),
        "stop_token_ids": _stop_token_ids,
        "min_tokens": lambda api, r: _min_tokens(api, r, eos_id),
        "include_stop_str_in_output": _include_stop_str,
        "skip_special_tokens": lambda api, r: _skip_special_tokens(api, r, eos_id, eos_text),
        "logit_bias": _logit_bias,
        "adapter_scale": _adapter_scale,
        "repetition_window": _repetition_window,
        "repetition_max_period": _repetition_max_period,
    }
    return {name: (lambda case: lambda api: case(api, route))(case) for name, case in cases.items()}


def _chat_logprobs(api: Api) -> None:
    assert api.openai("chat")["choices"][0]["logprobs"] is None
    content = api.openai("chat", logprobs=True)["choices"][0]["logprobs"]["content"]
    assert len(content) == MAX_TOKENS and all(e["logprob"] <= 0 for e in content)


def _chat_top_logprobs(api: Api) -> None:
    content = api.openai("chat", logprobs=True, top_logprobs=3)["choices"][0]["logprobs"]["content"]
    assert all(len(e["top_logprobs"]) == 3 for e in content)
    api.openai_refused("chat", "top_logprobs", top_logprobs=3)  # needs logprobs=true


def _messages(api: Api) -> None:
    other = [{"role": "user", "content": "Write a haiku about the sea."}]
    assert api.openai_text("chat", messages=other) != api.openai_text("chat")


def _message_role(api: Api) -> None:
    as_system = [{"role": "system", "content": MESSAGES[0]["content"]}]
    assert api.openai_text("chat", messages=as_system) != api.openai_text("chat")


def _message_content(api: Api) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": MESSAGES[0]["content"]}]}]
    assert api.openai_text("chat", messages=parts) == api.baseline("chat")
    api.openai_refused("chat", "messages", messages=[{"role": "user", "content": [{"type": "image_url"}]}])


def _message_name(api: Api, offline: Offline) -> None:
    """`name` reaches the chat template (the tiny model's template does not print it)."""
    template = "{% for m in messages %}{{ m.name }}: {{ m.content }}\n{% endfor %}"
    text = GenerationService.chat_prompt(offline.service, [{"role": "user", "content": "hi", "name": "ada"}],
                                         chat_template=template)
    assert text == "ada: hi\n"
    assert api.openai_text("chat", messages=[{**MESSAGES[0], "name": "ada"}])  # accepted


def _add_generation_prompt(api: Api) -> None:
    assert api.openai_text("chat", add_generation_prompt=False) != api.openai_text("chat")


def _chat_template(api: Api) -> None:
    api.openai_refused("chat", "chat_template", chat_template="{{ messages[0].content }}")


def _chat_template_kwargs(api: Api, offline: Offline) -> None:
    template = "{{ greeting }} {{ messages[0].content }}"
    text = GenerationService.chat_prompt(offline.service, MESSAGES, chat_template=template, greeting="hello")
    assert text == f"hello {MESSAGES[0]['content']}"
    assert api.openai_text("chat", chat_template_kwargs={"greeting": "hello"})  # scalars are passed on
    api.openai_refused("chat", "chat_template_kwargs", chat_template_kwargs={"greeting": {"nested": 1}})


def _completion_logprobs(api: Api) -> None:
    assert api.openai("completions")["choices"][0]["logprobs"] is None
    logprobs = api.openai("completions", logprobs=2)["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == MAX_TOKENS and all(len(t) == 2 for t in logprobs["top_logprobs"])


def _echo(api: Api) -> None:
    assert api.openai_text("completions", echo=True) == PROMPT + api.baseline("completions")


def _completion_best_of(api: Api) -> None:
    """vLLM's rule without ranking: best_of may only equal n."""
    api.openai_refused("completions", "best_of", best_of=2)
    assert len(api.openai("completions", n=2, best_of=2)["choices"]) == 2


def _prompt(api: Api) -> None:
    assert api.openai_text("completions", prompt="Once upon a time") != api.openai_text("completions")


# --------------------------------------------------------------------------- structured output

YES_NO = "(yes|no)"
COLOR_SCHEMA = {"type": "string", "enum": ["red", "green", "blue"]}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "required": ["city"], "additionalProperties": False,
                   "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}}}}}
STRUCTURED_TOKENS = 24  # room for a whole constrained answer
TOOL_TOKENS = 64  # room for one whole forced call


def _text_of(reply: dict, route: str) -> str:
    choice = reply["choices"][0]
    return choice["message"]["content"] if route == "chat" else choice["text"]


def _response_format(route: str) -> Case:
    """A JSON schema constrains the reply: it parses and validates; text is free output."""

    def case(api: Api) -> None:
        fmt = {"type": "json_schema", "json_schema": {"name": "color", "schema": COLOR_SCHEMA, "strict": True}}
        reply = api.openai(route, max_tokens=STRUCTURED_TOKENS, response_format=fmt)
        assert json.loads(_text_of(reply, route)) in COLOR_SCHEMA["enum"]
        assert api.openai_text(route, response_format={"type": "text"}) == api.baseline(route)
        api.openai_refused(route, "response_format", response_format={"type": "xml"})

    return case


def _structured_outputs(route: str) -> Case:
    def case(api: Api) -> None:
        text = _text_of(api.openai(route, max_tokens=STRUCTURED_TOKENS, structured_outputs={"regex": YES_NO}), route)
        assert text in ("yes", "no")
        api.openai_refused(route, "structured_outputs", structured_outputs={"regex": "(unclosed"})

    return case


def _tool_calls_of(api: Api, **fields) -> tuple[list[dict], str]:
    reply = api.openai("chat", max_tokens=TOOL_TOKENS, tools=[WEATHER_TOOL], **fields)
    choice = reply["choices"][0]
    return choice["message"].get("tool_calls") or [], choice["finish_reason"]


def _tools(api: Api) -> None:
    """Offered tools change the prompt (the generic tool instructions); a forced call parses."""
    assert api.openai_text("chat", tools=[WEATHER_TOOL], tool_choice="auto") != api.baseline("chat")
    api.openai_refused("chat", "tools", tools=[{"type": "function", "function": {}}])


def _tool_choice(api: Api) -> None:
    # One call (parallel calls off): a random-weight model would otherwise call again and again.
    named = {"type": "function", "function": {"name": "get_weather"}}
    calls, finish = _tool_calls_of(api, tool_choice=named, parallel_tool_calls=False)
    assert finish == "tool_calls" and calls and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"])["city"] in ("Paris", "Rome")
    calls, finish = _tool_calls_of(api, tool_choice="none")
    assert calls == [] and finish != "tool_calls"


def _parallel_tool_calls(api: Api) -> None:
    calls, finish = _tool_calls_of(api, tool_choice="required", parallel_tool_calls=False)
    assert finish == "tool_calls" and len(calls) == 1


def _history_with_call(**call_fields) -> list[dict]:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}, **call_fields}
    return [MESSAGES[0], {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]


def _message_tool_calls(api: Api) -> None:
    """An assistant's tool calls are rendered back into the prompt."""
    with_call = api.openai_text("chat", messages=_history_with_call(), tools=[WEATHER_TOOL], tool_choice="none")
    history = _history_with_call()
    history[1] = {"role": "assistant", "content": ""}
    without = api.openai_text("chat", messages=history, tools=[WEATHER_TOOL], tool_choice="none")
    assert with_call != without
    bad = _history_with_call()
    bad[1]["tool_calls"] = [{"type": "function", "function": {"arguments": "{}"}}]
    api.openai_refused("chat", "messages", messages=bad)


def _message_tool_call_id(api: Api, offline: Offline) -> None:
    """`tool_call_id` reaches a template that knows tools (the tiny model's does not)."""
    template = "{% for m in messages %}{{ m.role }}:{{ m.tool_call_id or '' }}:{{ m.content }}\n{% endfor %}"
    rendered, _ = render_history(_history_with_call()[2:], None, knows_tools=True)
    assert GenerationService.chat_prompt(offline.service, rendered, chat_template=template) == "tool:call_1:sunny, 21 C\n"
    assert api.openai_text("chat", messages=_history_with_call(), tools=[WEATHER_TOOL], tool_choice="none")


def _tgi_grammar(api: Api) -> None:
    text = _gen_text(api, max_new_tokens=STRUCTURED_TOKENS, grammar={"type": "regex", "value": YES_NO})
    assert text in ("yes", "no")
    reply = _gen_text(api, max_new_tokens=STRUCTURED_TOKENS, grammar={"type": "json", "value": COLOR_SCHEMA})
    assert json.loads(reply) in COLOR_SCHEMA["enum"]
    # An uncompilable grammar is a 400 (not TGI's 422 for validation): the engine refused it.
    assert "grammar" in api.generate(status=400, grammar={"type": "regex", "value": "(unclosed"})["error"]


def _tgi_response_format(api: Api) -> None:
    """LoRAX's shape: {"type": "json_object", "schema": ...}."""
    reply = _gen_text(api, max_new_tokens=STRUCTURED_TOKENS,
                      response_format={"type": "json_object", "schema": COLOR_SCHEMA})
    assert json.loads(reply) in COLOR_SCHEMA["enum"]
    assert "response_format" in api.generate(status=400, response_format={"type": "xml"})["error"]


def _merged_adapters(route: str) -> Case:
    """One adapter merged at weight 1 is that adapter; at 0.5 it is neither it nor the base."""

    def case(api: Api) -> None:
        alpha = api.openai_text(route, model="alpha")
        assert api.openai_text(route, merged_adapters={"ids": ["alpha"], "weights": [1.0]}) == alpha
        half = api.openai_text(route, merged_adapters={"ids": ["alpha"], "weights": [0.5]})
        assert half not in (alpha, api.baseline(route))
        api.openai_refused(route, "merged_adapters.merge_strategy",
                           merged_adapters={"ids": ["alpha"], "weights": [1.0], "merge_strategy": "mean"})

    return case


def _tgi_merged_adapters(api: Api) -> None:
    alpha = _gen_text(api, adapter_id="alpha")
    assert _gen_text(api, merged_adapters={"ids": ["alpha"], "weights": [1.0]}) == alpha
    api.generate_refused("merged_adapters.density",
                         merged_adapters={"ids": ["alpha"], "weights": [1.0], "merge_strategy": "ties", "density": 2})


# --------------------------------------------------------------------------- TGI cases


def _gen_text(api: Api, **parameters) -> str:
    return api.generate(**parameters)["generated_text"]


def _tgi_same_as_greedy_when_it_keeps_one(field: str, value) -> Case:
    def case(api: Api) -> None:
        greedy = api.baseline("generate")
        assert any(_gen_text(api, do_sample=True, seed=s) != greedy for s in range(2))
        assert all(_gen_text(api, do_sample=True, seed=s, **{field: value}) == greedy for s in range(2))

    return case


def _tgi_typical_p(api: Api) -> None:
    """typical_p alone turns sampling on; with the same seed it changes the draw."""
    for seed in range(2):
        assert _gen_text(api, seed=seed, typical_p=1e-6) != _gen_text(api, do_sample=True, seed=seed)
    assert api.generate(typical_p=0.5)["details"]["seed"] is not None


def _tgi_temperature(api: Api) -> None:
    greedy = api.baseline("generate")
    assert {_gen_text(api, temperature=1.5, seed=s) for s in range(2)} != {greedy}
    assert _gen_text(api, do_sample=True, temperature=0.0) == greedy  # 0 means greedy


def _tgi_seed(api: Api) -> None:
    first = api.generate(do_sample=True, seed=5)
    assert first == api.generate(do_sample=True, seed=5) and first["details"]["seed"] == 5
    assert {_gen_text(api, do_sample=True, seed=s) for s in (6, 7, 8)} != {first["generated_text"]}


def _tgi_do_sample(api: Api) -> None:
    assert api.generate(do_sample=False)["details"]["seed"] is None
    assert {_gen_text(api, do_sample=True, seed=s) for s in range(2)} != {api.baseline("generate")}


def _tgi_penalty(field: str, value: float) -> Case:
    def case(api: Api) -> None:
        assert _gen_text(api, max_new_tokens=16) != _gen_text(api, max_new_tokens=16, **{field: value})

    return case


def _tgi_adapter_id(api: Api) -> None:
    assert _gen_text(api, adapter_id="alpha") != _gen_text(api)
    api.generate(status=404, adapter_id="no-such-adapter")


def _tgi_adapter_scale(api: Api) -> None:
    base, alpha = _gen_text(api), _gen_text(api, adapter_id="alpha")
    assert _gen_text(api, adapter_id="alpha", adapter_scale=0.0) == base
    assert _gen_text(api, adapter_id="alpha", adapter_scale=1.0) == alpha
    assert _gen_text(api, adapter_id="alpha", adapter_scale=0.5) not in (base, alpha)
    api.generate_refused("adapter_scale", adapter_id="alpha", adapter_scale=9.0)


def _tgi_best_of(api: Api) -> None:
    answer = api.generate(best_of=3, do_sample=True, top_k=50)
    others = answer["details"]["best_of_sequences"]
    assert len(others) == 2

    def score(sequence: dict) -> float:
        return sum(t["logprob"] for t in sequence["tokens"])

    assert all(score(answer["details"]) >= score(s) for s in others)
    seeds = {answer["details"]["seed"], *(s["seed"] for s in others)}
    assert len(seeds) == 3  # each sequence drew with its own seed
    api.generate_refused("best_of", best_of=2)  # greedy: all sequences would be the same
    api.generate_refused("best_of", best_of=2, do_sample=True, seed=1)
    response = api.client.post("/generate_stream", json={"inputs": PROMPT, "parameters": {"best_of": 2, "do_sample": True}})
    assert response.status_code == 422 and "best_of" in response.json()["error"]


def _tgi_details(api: Api) -> None:
    assert "details" not in api.generate(details=False)
    details = api.generate()["details"]
    assert details["generated_tokens"] == MAX_TOKENS and len(details["tokens"]) == MAX_TOKENS


def _tgi_decoder_input_details(api: Api) -> None:
    assert api.generate()["details"]["prefill"] == []
    details = api.generate(decoder_input_details=True)["details"]
    prefill = details["prefill"]
    assert len(prefill) == details["prompt_tokens"] > 1 and prefill[0]["logprob"] is None
    assert all(token["logprob"] <= 0 for token in prefill[1:])


def _tgi_ignore_eos_token(api: Api, offline: Offline) -> None:
    """The tiny model never picks EOS by itself and TGI has no logit_bias: the route's
    params are run offline with EOS forced."""
    service = offline.service
    eos = service.tokenizer.eos_token_id

    def params(**fields) -> SamplingParams:
        body = tgi_api.TgiRequest(inputs=PROMPT, parameters={"max_new_tokens": MAX_TOKENS, **fields})
        return asyncio.run(tgi_api.build_generation(service, body)).params

    ids = service.encode(PROMPT)
    runs = [
        OfflineEngine(service.parts.core).generate(
            [OfflineRequest(ids, replace(params(**fields), logit_bias=((eos, 100.0),)))]
        )[0]
        for fields in ({}, {"ignore_eos_token": True})
    ]
    assert len(runs[0].token_ids) == 1 and len(runs[1].token_ids) == MAX_TOKENS
    assert api.generate(ignore_eos_token=True)["details"]["generated_tokens"] == MAX_TOKENS


def _tgi_max_new_tokens(api: Api) -> None:
    assert api.generate(max_new_tokens=3)["details"]["generated_tokens"] == 3


def _tgi_return_full_text(api: Api) -> None:
    assert _gen_text(api, return_full_text=True) == PROMPT + _gen_text(api)


def _tgi_stop(api: Api) -> None:
    text = _gen_text(api, max_new_tokens=12)
    cut = _stop_string(text)
    answer = api.generate(max_new_tokens=12, stop=[cut])
    assert answer["generated_text"] == text[: text.index(cut)]
    assert answer["details"]["finish_reason"] == "stop_sequence"


def _tgi_truncate(api: Api) -> None:
    assert api.generate(truncate=2)["details"]["prompt_tokens"] == 2
    assert api.generate()["details"]["prompt_tokens"] > 2


def _tgi_return_k_alternatives(api: Api) -> None:
    tokens = api.generate(return_k_alternatives=2)["details"]["tokens"]
    assert all(len(t["alternative_tokens"]) == 2 for t in tokens)
    assert all("alternative_tokens" not in t for t in api.generate()["details"]["tokens"])


def _tgi_top_n_tokens(api: Api) -> None:
    details = api.generate(top_n_tokens=3)["details"]
    assert len(details["top_tokens"]) == MAX_TOKENS
    for token, top in zip(details["tokens"], details["top_tokens"]):
        assert len(top) == 3 and top[0]["id"] == token["id"]  # greedy: the chosen one is the most likely
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
    assert "top_tokens" not in api.generate()["details"]
    api.generate_refused("top_n_tokens", top_n_tokens=99)


def _tgi_repetition_window(api: Api) -> None:
    free = api.generate(inputs=api.loop_text, max_new_tokens=LOOP_TOKENS)["details"]
    assert free["generated_tokens"] == LOOP_TOKENS and "stop_reason" not in free
    cut = api.generate(inputs=api.loop_text, max_new_tokens=LOOP_TOKENS, repetition_window=6)["details"]
    assert cut["generated_tokens"] == LOOP_CUT
    assert cut["finish_reason"] == "length" and cut["stop_reason"] == "repetition"
    api.generate_refused("repetition_window", repetition_window=100_000)


def _tgi_repetition_max_period(api: Api) -> None:
    free = api.generate(inputs=api.loop_text, max_new_tokens=LOOP_TOKENS, repetition_window=6,
                        repetition_max_period=1)["details"]
    assert free["generated_tokens"] == LOOP_TOKENS  # the loop is 2 tokens long
    api.generate_refused("repetition_max_period", repetition_window=6, repetition_max_period=0)


def _refused(field: str, **parameters) -> Case:
    return lambda api: api.generate_refused(field, **parameters)


def _tgi_inputs(api: Api) -> None:
    assert _gen_text(api, inputs="Once upon a time") != _gen_text(api)


def _tgi_stream(api: Api) -> None:
    text = _gen_text(api)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": MAX_TOKENS}, "stream": True}
    streamed = ""
    with api.client.stream("POST", "/", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                streamed += json.loads(line[5:])["token"]["text"]
    assert streamed == text
    assert api.post("/", {"inputs": PROMPT, "parameters": {"max_new_tokens": MAX_TOKENS}}).json()[0]["generated_text"] == text


def _tgi_parameters(api: Api) -> None:
    assert api.generate(max_new_tokens=2)["details"]["generated_tokens"] == 2


# --------------------------------------------------------------------------- the table


def cases(tokens: dict) -> dict[str, Callable]:
    table: dict[str, Callable] = {}
    for model, route in (("ChatCompletionRequest", "chat"), ("CompletionRequest", "completions")):
        for name, case in shared_cases(route, tokens).items():
            table[f"{model}.{name}"] = case
    table.update({
        "ChatCompletionRequest.messages": _messages,
        "ChatCompletionRequest.max_tokens": _max_tokens("chat", "max_tokens"),
        "ChatCompletionRequest.max_completion_tokens": _max_tokens("chat", "max_completion_tokens"),
        "ChatCompletionRequest.logprobs": _chat_logprobs,
        "ChatCompletionRequest.top_logprobs": _chat_top_logprobs,
        "ChatCompletionRequest.tools": _tools,
        "ChatCompletionRequest.tool_choice": _tool_choice,
        "ChatCompletionRequest.parallel_tool_calls": _parallel_tool_calls,
        "ChatCompletionRequest.response_format": _response_format("chat"),
        "ChatCompletionRequest.structured_outputs": _structured_outputs("chat"),
        "ChatMessage.tool_calls": _message_tool_calls,
        "ChatMessage.tool_call_id": _message_tool_call_id,
        "CompletionRequest.response_format": _response_format("completions"),
        "CompletionRequest.structured_outputs": _structured_outputs("completions"),
        "ChatCompletionRequest.add_generation_prompt": _add_generation_prompt,
        "ChatCompletionRequest.chat_template": _chat_template,
        "ChatCompletionRequest.chat_template_kwargs": _chat_template_kwargs,
        "ChatMessage.role": _message_role,
        "ChatMessage.content": _message_content,
        "ChatMessage.name": _message_name,
        "StreamOptions.include_usage": lambda api: _stream(api, "chat"),
        "CompletionRequest.prompt": _prompt,
        "CompletionRequest.max_tokens": _max_tokens("completions", "max_tokens"),
        "CompletionRequest.logprobs": _completion_logprobs,
        "CompletionRequest.echo": _echo,
        "CompletionRequest.suffix": lambda api: api.openai_refused("completions", "suffix", suffix="!"),
        "CompletionRequest.best_of": _completion_best_of,
        "TgiRequest.inputs": _tgi_inputs,
        "TgiRequest.parameters": _tgi_parameters,
        "TgiRequest.stream": _tgi_stream,
        "TgiParameters.adapter_id": _tgi_adapter_id,
        "TgiParameters.adapter_source": _refused("adapter_source", adapter_source="s3"),
        "TgiParameters.merged_adapters": _tgi_merged_adapters,
        "ChatCompletionRequest.merged_adapters": _merged_adapters("chat"),
        "CompletionRequest.merged_adapters": _merged_adapters("completions"),
        "TgiParameters.api_token": _refused("api_token", api_token="hf_secret"),
        "TgiParameters.best_of": _tgi_best_of,
        "TgiParameters.decoder_input_details": _tgi_decoder_input_details,
        "TgiParameters.details": _tgi_details,
        "TgiParameters.do_sample": _tgi_do_sample,
        "TgiParameters.frequency_penalty": _tgi_penalty("frequency_penalty", 2.0),
        "TgiParameters.presence_penalty": _tgi_penalty("presence_penalty", 2.0),
        "TgiParameters.repetition_penalty": _tgi_penalty("repetition_penalty", 3.0),
        "TgiParameters.ignore_eos_token": _tgi_ignore_eos_token,
        "TgiParameters.max_new_tokens": _tgi_max_new_tokens,
        "TgiParameters.return_full_text": _tgi_return_full_text,
        "TgiParameters.seed": _tgi_seed,
        "TgiParameters.stop": _tgi_stop,
        "TgiParameters.temperature": _tgi_temperature,
        "TgiParameters.top_k": _tgi_same_as_greedy_when_it_keeps_one("top_k", 1),
        "TgiParameters.top_p": _tgi_same_as_greedy_when_it_keeps_one("top_p", 1e-6),
        "TgiParameters.min_p": _tgi_same_as_greedy_when_it_keeps_one("min_p", 1.0),
        "TgiParameters.typical_p": _tgi_typical_p,
        "TgiParameters.truncate": _tgi_truncate,
        "TgiParameters.watermark": _refused("watermark", watermark=True),
        "TgiParameters.response_format": _tgi_response_format,
        "TgiParameters.grammar": _tgi_grammar,
        "TgiParameters.return_k_alternatives": _tgi_return_k_alternatives,
        "TgiParameters.top_n_tokens": _tgi_top_n_tokens,
        "TgiParameters.adapter_scale": _tgi_adapter_scale,
        "TgiParameters.repetition_window": _tgi_repetition_window,
        "TgiParameters.repetition_max_period": _tgi_repetition_max_period,
    })
    return table


TAKES_OFFLINE = {"ChatMessage.name", "ChatMessage.tool_call_id", "ChatCompletionRequest.chat_template_kwargs", "TgiParameters.ignore_eos_token"}
_CASE_NAMES = sorted(cases({"eos_id": 0, "eos_text": ""}))


@pytest.fixture(scope="module")
def api(tiny_server, tiny_reference):
    loop_text = tiny_reference.tokenizer.apply_chat_template(
        [{"role": "user", "content": LOOP_MESSAGE}], add_generation_prompt=True, tokenize=False)
    with tiny_server.client() as client:
        client.timeout = httpx.Timeout(300.0)  # the whole walk shares one server at once
        yield Api(client, loop_text)


@pytest.fixture(scope="module")
def offline(tiny_reference) -> Offline:
    return Offline(tiny_reference.parts)


@pytest.fixture(scope="module")
def table(tiny_reference) -> dict[str, Callable]:
    tokenizer = tiny_reference.tokenizer
    return cases({"eos_id": tokenizer.eos_token_id, "eos_text": tokenizer.eos_token})


@pytest.fixture(scope="module")
def outcomes(api, offline, table) -> dict[str, BaseException | None]:
    """Every case run at once from a thread pool: the server batches their requests (as it
    would any clients'), so the walk costs a few batched runs rather than a few hundred
    one-by-one. Each test below reports its own case's outcome."""

    def run(field: str) -> BaseException | None:
        try:
            table[field](api, offline) if field in TAKES_OFFLINE else table[field](api)
        except BaseException as exc:  # noqa: BLE001 - reported by the field's own test
            return exc
        return None

    with ThreadPoolExecutor(CONCURRENT_CASES) as pool:
        return dict(zip(_CASE_NAMES, pool.map(run, _CASE_NAMES)))


def test_every_field_has_a_case():
    fields = all_fields()
    assert len(fields) > 50  # the discovery found the route models
    assert [f for f in fields if f not in _CASE_NAMES] == [], "a request field without a case"
    assert [c for c in _CASE_NAMES if c not in fields] == [], "a case for a field that no longer exists"


@pytest.mark.parametrize("field", _CASE_NAMES)
def test_field_works_or_is_refused(field, outcomes):
    if outcomes[field] is not None:
        raise outcomes[field]


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_unknown_openai_fields_are_refused_by_name(api, route):
    api.openai_refused(route, "guided_json", guided_json={"type": "object"})
    api.openai_refused(route, "stream_options.chunk_size", stream=True, stream_options={"chunk_size": 3})
    assert api.openai_text(route, guided_json=None)  # null, as SDKs send unset fields: accepted


def test_unknown_tgi_fields_are_refused_by_name(api):
    api.generate_refused("parameters.grammar_v2", grammar_v2={"type": "json"})
    response = api.client.post("/generate", json={"inputs": PROMPT, "extras": 1})
    assert response.status_code == 422 and "extras" in response.json()["error"]
    assert api.generate(unknown_but_null=None)["generated_text"]


def test_server_default_repetition_guard(tiny_reference, tiny_files):
    """--default-repetition-window guards every request that sets no window of its own."""
    args = build_parser().parse_args(["serve", "--model", str(tiny_files.model), "--default-repetition-window", "5"])
    server = config_from_args(args).server
    assert server.default_repetition_window == 5
    assert config_from_args(build_parser().parse_args(["serve", "--model", str(tiny_files.model)])).server.default_repetition_window == 0

    service = Offline(tiny_reference.parts).service  # its own: the config changes below
    service.config = replace(service.config, server=server)
    forced = {"max_tokens": 12, "temperature": 0.0, "logit_bias": ((FORCED, 100.0),)}
    guarded, own_off = service.sampling_params(**forced), service.sampling_params(repetition_window=0, **forced)
    assert (guarded.repetition_window, own_off.repetition_window) == (5, 0)
    ids = service.encode(PROMPT)
    cut, free = OfflineEngine(service.parts.core).generate([OfflineRequest(ids, guarded), OfflineRequest(ids, own_off)])
    assert len(cut.token_ids) == 5 and cut.finish_reason is FinishReason.REPETITION
    assert len(free.token_ids) == 12 and free.finish_reason is FinishReason.LENGTH
