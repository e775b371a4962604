"""Structured output and tool calling on the default model, through the `openai` package,
lorax-client and plain HTTP: every constrained output parses and validates against its
JSON schema (jsonschema) or fully matches its regex, with the base model and with a demo
adapter (examples/adapters), constrained and free requests sharing batches."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest
from lorax import AsyncClient

from loramux.server.model_fetch import default_model_dir
from tests.e2e.conftest import REPO, start_server, stop_server
from tests.structured.schemas import REGEXES, SCHEMAS

pytestmark = [pytest.mark.model, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

NAME = "smollm2"
ADAPTER = "json"  # a demo adapter; any would do
MODELS = (NAME, ADAPTER)
MAX_TOKENS = 80
QUESTION = [{"role": "user", "content": "Describe a person as JSON."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12},
                           "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a time zone.",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
                       "required": ["zone"]},
    },
}
TOOLS = [WEATHER, TIME]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
TOOL_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("e2e-logs") / "structured-server.log"
    server = start_server([
        "--model", str(default_model_dir()), "--served-model-name", NAME,
        "--adapter-dir", str(REPO / "examples" / "adapters"), "--upload-dir", str(log_path.parent / "uploads"),
        "--max-loras", "4", "--max-lora-rank", "8", "--kv-cache-bytes", "128M", "--max-model-len", "1024",
        "--threads", "2", "--log-level", "warning",
    ], log_path)
    yield server
    stop_server(server)


def client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=900)


def schema_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


async def chat_text(c: openai.AsyncOpenAI, stream: bool, **kwargs) -> tuple[str, str]:
    if not stream:
        r = await c.chat.completions.create(**kwargs)
        return r.choices[0].message.content, r.choices[0].finish_reason
    text, finish = "", None
    async for chunk in await c.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish


def test_json_schemas_through_the_openai_sdk_in_mixed_batches(server):
    """Every schema, base and adapter, streamed and not, beside free requests, at once."""
    async def scenario():
        async with client(server) as c:
            jobs = []
            for i, (name, schema) in enumerate(SCHEMAS.items()):
                for model in MODELS:
                    stream = (i + len(model)) % 2 == 0
                    jobs.append(chat_text(c, stream, model=model, messages=QUESTION, max_tokens=MAX_TOKENS,
                                          temperature=0, response_format=schema_format(name, schema)))
            free = [chat_text(c, False, model=m, messages=QUESTION, max_tokens=8, temperature=0) for m in MODELS]
            return await asyncio.gather(*jobs), await asyncio.gather(*free)

    constrained, free = asyncio.run(scenario())
    cases = [(name, model) for name in SCHEMAS for model in MODELS]
    for (name, model), (text, finish) in zip(cases, constrained):
        assert finish == "stop", (name, model, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name])
    for text, finish in free:
        assert text and finish == "length"  # free rows run to their budget, no grammar ends them


def test_json_object_regex_and_completions_through_the_openai_sdk(server):
    async def scenario():
        async with client(server) as c:
            obj = await c.chat.completions.create(model=ADAPTER, messages=QUESTION, max_tokens=MAX_TOKENS,
                                                  temperature=0, response_format={"type": "json_object"})
            regexes = await asyncio.gather(*[
                chat_text(c, stream, model=model, messages=[{"role": "user", "content": "Give me a value."}],
                          max_tokens=24, temperature=0.7, seed=3, extra_body={"structured_outputs": {"regex": rx}})
                for (name, rx), stream, model in zip(REGEXES.items(), (False, True, False), (NAME, ADAPTER, NAME))
            ])
            completion = await c.completions.create(
                model=NAME, prompt="A user record in JSON:", max_tokens=MAX_TOKENS, temperature=0,
                extra_body={"response_format": schema_format("nested", SCHEMAS["nested"])})
            streamed = ""
            async for chunk in await c.completions.create(
                    model=ADAPTER, prompt="A phone number:", max_tokens=24, temperature=0, stream=True,
                    extra_body={"structured_outputs": {"regex": REGEXES["phone"]}}):
                streamed += chunk.choices[0].text if chunk.choices else ""
            return obj, regexes, completion, streamed

    obj, regexes, completion, streamed = asyncio.run(scenario())
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    for (name, rx), (text, finish) in zip(REGEXES.items(), regexes):
        assert re.fullmatch(rx, text) and finish == "stop", (name, text)
    jsonschema.validate(json.loads(completion.choices[0].text), SCHEMAS["nested"])
    assert re.fullmatch(REGEXES["phone"], streamed)


def test_json_schemas_and_regexes_through_lorax_client_and_tgi_grammar(server):
    async def scenario():
        lorax = AsyncClient(server.url, timeout=900)
        schema_jobs = [
            lorax.generate("A JSON record:", adapter_id=adapter, max_new_tokens=MAX_TOKENS,
                           response_format={"type": "json_object", "schema": schema})
            for schema in SCHEMAS.values() for adapter in (None, ADAPTER)
        ]
        stream_text = ""
        async for event in lorax.generate_stream("A JSON record:", adapter_id=ADAPTER, max_new_tokens=MAX_TOKENS,
                                                 response_format={"type": "json_object",
                                                                  "schema": SCHEMAS["array_enum"]}):
            stream_text += event.token.text if not event.token.special else ""
        async with httpx.AsyncClient(base_url=server.url, timeout=900) as http:
            grammar_jobs = [
                http.post("/generate", json={"inputs": "Value:", "parameters": {
                    "adapter_id": adapter, "max_new_tokens": 24, "grammar": {"type": "regex", "value": rx}}})
                for rx in REGEXES.values() for adapter in (None, ADAPTER)
            ]
            tgi_json = http.post("/generate", json={"inputs": "JSON:", "parameters": {
                "max_new_tokens": MAX_TOKENS, "grammar": {"type": "json", "value": SCHEMAS["bounded_numbers"]}}})
            results = await asyncio.gather(*schema_jobs, *grammar_jobs, tgi_json)
        return results, stream_text

    results, stream_text = asyncio.run(scenario())
    schema_results = results[: 2 * len(SCHEMAS)]
    for schema, r in zip([s for s in SCHEMAS.values() for _ in (0, 1)], schema_results):
        jsonschema.validate(json.loads(r.generated_text), schema)
    jsonschema.validate(json.loads(stream_text), SCHEMAS["array_enum"])
    regex_results = results[2 * len(SCHEMAS): -1]
    for rx, r in zip([rx for rx in REGEXES.values() for _ in (0, 1)], regex_results):
        assert r.status_code == 200
        assert re.fullmatch(rx, r.json()["generated_text"])
    assert results[-1].status_code == 200
    jsonschema.validate(json.loads(results[-1].json()["generated_text"]), SCHEMAS["bounded_numbers"])


@pytest.mark.parametrize(("route", "body", "param"), [
    ("/v1/chat/completions", {"messages": QUESTION, "response_format": schema_format("x", {"type": "objec"})},
     "response_format.json_schema.schema"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "a("}}, "structured_outputs.regex"),
    ("/v1/chat/completions", {"messages": QUESTION, "response_format": {"type": "xml"}}, "response_format.type"),
    ("/v1/chat/completions", {"messages": QUESTION, "tools": [WEATHER], "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "(unclosed"}}},
     "grammar.value"),
    ("/generate", {"inputs": "x", "parameters": {"response_format": {"type": "json_object",
                                                                      "schema": {"type": "integer", "minimum": "a"}}}},
     "response_format.schema"),
])
def test_a_grammar_that_cannot_compile_is_a_400_naming_the_field(server, route, body, param):
    r = httpx.post(f"{server.url}{route}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    if route.startswith("/v1"):
        assert error["param"] == param and param in error["message"]
    else:
        assert param in error


# --------------------------------------------------------------------------- tools


def check_calls(calls, allowed: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


async def stream_tool_reply(c, **kwargs):
    content, calls, finish = "", [], None
    async for chunk in await c.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_named_none_and_auto(server, stream):
    named = {"type": "function", "function": {"name": "get_time"}}
    choices = [("required", NAME, False), (named, ADAPTER, False), ("required", ADAPTER, True), ("none", NAME, True),
               ("auto", NAME, True)]

    async def ask(c, tool_choice, model, parallel):
        kwargs = dict(model=model, messages=TOOL_QUESTION, tools=TOOLS, tool_choice=tool_choice, max_tokens=64,
                      temperature=0, parallel_tool_calls=parallel)
        if stream:
            return await stream_tool_reply(c, **kwargs)
        r = (await c.chat.completions.create(**kwargs)).choices[0]
        return r.message.content, r.message.tool_calls or [], r.finish_reason

    async def scenario():
        async with client(server) as c:
            return await asyncio.gather(*[ask(c, *choice) for choice in choices])

    (req, req_calls, req_finish), (nam, nam_calls, nam_finish), (par, par_calls, par_finish), \
        (none, none_calls, none_finish), (auto, auto_calls, auto_finish) = asyncio.run(scenario())
    assert req_finish == nam_finish == "tool_calls"
    check_calls(req_calls, {"get_weather", "get_time"})
    check_calls(nam_calls, {"get_time"})
    assert len(req_calls) == len(nam_calls) == 1  # parallel_tool_calls=False
    assert not req and not nam  # forced calls carry no text
    # Parallel calls: as many as the model makes (a small model may go on until max_tokens);
    # every complete one parses and validates.
    check_calls(par_calls, {"get_weather", "get_time"})
    assert par_finish in ("tool_calls", "length")
    assert none_calls == [] and none_finish in ("stop", "length") and none
    if auto_finish == "tool_calls":  # the model's choice; either way the reply is well formed
        check_calls(auto_calls, {"get_weather", "get_time"})
    else:
        assert auto_calls == [] and auto
    if stream:
        assert [c.index for c in par_calls] == list(range(len(par_calls)))


def test_tool_history_is_rendered_back(server):
    history = TOOL_QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"},
    ]

    async def scenario():
        async with client(server) as c:
            return await c.chat.completions.create(model=NAME, messages=history, tools=TOOLS, max_tokens=24,
                                                   temperature=0, tool_choice="none")

    reply = asyncio.run(scenario()).choices[0]
    assert reply.message.content and not reply.message.tool_calls
    assert reply.finish_reason in ("stop", "length")
