"""API fields -> grammar specs, the compiler's cache and bounds, and the tool-call format:
validation, prompt rendering, the grammar and the parser (streamed and whole)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import xgrammar

from loramux.server.structured import compiler as compiler_module
from loramux.server.structured.compiler import GrammarCompiler, GrammarLimits
from loramux.server.structured.spec import (
    JSON_SCHEMA,
    REGEX,
    GrammarError,
    from_response_format,
    from_structured_outputs,
    from_tgi_grammar,
    json_schema_spec,
    one_of,
    regex_spec,
)
from loramux.server.structured.tools import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ToolCallParser,
    parse_tool_calling,
    parse_tool_calls,
    render_history,
    template_knows_tools,
)

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "clock"}}


def test_every_api_shape_becomes_one_spec_and_equal_grammars_share_a_key():
    openai = from_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    lorax = from_response_format({"type": "json_object", "schema": json.dumps(SCHEMA)})
    tgi = from_tgi_grammar({"type": "json", "value": dict(reversed(list(SCHEMA.items())))})
    vllm = from_structured_outputs({"json": SCHEMA})
    assert {s.kind for s in (openai, lorax, tgi, vllm)} == {JSON_SCHEMA}
    assert openai.key == lorax.key == tgi.key == vllm.key  # key order and field do not matter
    loose = from_response_format({"type": "json_schema", "json_schema": {"schema": SCHEMA, "strict": False}})
    assert loose.key != openai.key and not loose.strict
    assert from_response_format({"type": "json_object"}).text == '{"type":"object"}'
    assert from_tgi_grammar({"type": "regex", "value": "a+"}).kind == REGEX
    assert from_response_format({"type": "text"}) is None and from_response_format(None) is None


@pytest.mark.parametrize(("call", "param"), [
    (lambda: from_response_format({"type": "xml"}), "response_format.type"),
    (lambda: from_response_format({"type": "json_schema", "json_schema": {}}), "response_format.json_schema"),
    (lambda: from_response_format({"type": "json_schema", "json_schema": {"schema": SCHEMA, "strict": "yes"}}),
     "response_format.json_schema.strict"),
    (lambda: from_response_format({"type": "json_object", "schema": "{not json"}), "response_format.schema"),
    (lambda: from_tgi_grammar({"type": "regex", "value": 3}), "grammar.value"),
    (lambda: from_tgi_grammar({"type": "lark", "value": "x"}), "grammar.type"),
    (lambda: from_structured_outputs({"json": SCHEMA, "regex": "a"}), "structured_outputs"),
    (lambda: from_structured_outputs({"grammar": "x"}), "structured_outputs"),
    (lambda: from_structured_outputs({"json": {"type": "array", "items": {"type": "string", "minLength": 10**8}}}),
     "structured_outputs.json"),
    (lambda: one_of(regex_spec("a", "grammar"), json_schema_spec(SCHEMA, "response_format")), "response_format"),
])
def test_malformed_fields_raise_naming_the_field(call, param):
    with pytest.raises(GrammarError) as error:
        call()
    assert error.value.param == param


@pytest.fixture(scope="module")
def compiler(smol_tokenizer):
    compiler = GrammarCompiler(smol_tokenizer, len(smol_tokenizer), [smol_tokenizer.eos_token_id],
                               GrammarLimits(max_spec_bytes=2048, compile_timeout_s=5.0, cache_entries=3))
    yield compiler
    compiler.close()


def test_compiles_are_cached_by_hash_errors_too_and_bounded(compiler):
    first = compiler.compile_sync(json_schema_spec(SCHEMA, "response_format"))
    again = asyncio.run(compiler.compile(from_tgi_grammar({"type": "json", "value": SCHEMA})))
    assert again is first and isinstance(first, xgrammar.CompiledGrammar)
    with pytest.raises(GrammarError) as bad:
        compiler.compile_sync(regex_spec("a(", "grammar.value"))
    assert bad.value.param == "grammar.value" and "cannot be compiled" in str(bad.value)
    assert ".cc:" not in str(bad.value)  # no native source locations
    with pytest.raises(GrammarError) as cached:  # the cached error, renamed to this field
        asyncio.run(compiler.compile(regex_spec("a(", "structured_outputs.regex")))
    assert cached.value.param == "structured_outputs.regex" and "structured_outputs.regex" in str(cached.value)
    for i in range(4):  # the LRU keeps cache_entries
        compiler.compile_sync(regex_spec(f"x{i}", "grammar"))
    assert compiler.num_cached == 3
    with pytest.raises(GrammarError, match="at most 2048 bytes"):
        asyncio.run(compiler.compile(regex_spec("a" * 4096, "grammar.value")))


def test_a_slow_compile_is_refused_in_time(smol_tokenizer, monkeypatch):
    compiler = GrammarCompiler(smol_tokenizer, len(smol_tokenizer), [0], GrammarLimits(compile_timeout_s=0.2))
    monkeypatch.setattr(compiler, "_compile", lambda spec: time.sleep(1.0))
    started = time.perf_counter()
    with pytest.raises(GrammarError, match="within 0.2 s") as error:
        asyncio.run(compiler.compile(regex_spec("b+", "grammar.value")))
    assert error.value.param == "grammar.value" and time.perf_counter() - started < 0.9
    compiler.close()
    assert compiler_module.GrammarLimits().compile_timeout_s > 0


# --------------------------------------------------------------------------- tools


def test_tool_choice_modes_and_their_errors():
    assert parse_tool_calling(None, None, None) is None
    assert parse_tool_calling([WEATHER], "none", None) is None
    auto = parse_tool_calling([WEATHER, CLOCK], None, None)
    assert auto.choice == "auto" and auto.parallel and auto.names() == {"get_weather", "clock"}
    required = parse_tool_calling([WEATHER], "required", False)
    assert required.choice == "required" and not required.parallel
    named = parse_tool_calling([WEATHER, CLOCK], {"type": "function", "function": {"name": "clock"}}, None)
    assert named.named == "clock"
    assert "get_weather" not in named.grammar_spec().text and "clock" in named.grammar_spec().text
    for tools, choice in (([WEATHER], "always"), ([WEATHER], {"type": "function", "function": {"name": "x"}}),
                          (None, "required"), ([WEATHER, WEATHER], None), ([{"type": "code"}], None),
                          ([{"type": "function", "function": {"name": "bad name!"}}], None)):
        with pytest.raises(GrammarError) as error:
            parse_tool_calling(tools, choice, None)
        assert error.value.param in ("tools", "tool_choice")


@pytest.mark.parametrize("choice", ["auto", "required", {"type": "function", "function": {"name": "get_weather"}}])
def test_the_tool_grammar_compiles_and_only_admits_valid_calls(compiler, smol_tokenizer, choice):
    calling = parse_tool_calling([WEATHER, CLOCK], choice, False)
    grammar = compiler.compile_sync(calling.grammar_spec())
    good = f'{TOOL_CALL_OPEN}\n{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}\n{TOOL_CALL_CLOSE}'
    bad = f'{TOOL_CALL_OPEN}\n{{"name": "get_weather", "arguments": {{"town": "Paris"}}}}\n{TOOL_CALL_CLOSE}'
    assert xgrammar.GrammarMatcher(grammar).accept_string(good)
    assert not xgrammar.GrammarMatcher(grammar).accept_string(bad)
    free_text = xgrammar.GrammarMatcher(grammar).accept_string("Sunny today.")
    assert free_text == (choice == "auto")  # only auto lets the model answer in text
    two = xgrammar.GrammarMatcher(grammar)
    assert two.accept_string(good)
    clock = f'{TOOL_CALL_OPEN}\n{{"name": "clock", "arguments": {{}}}}\n{TOOL_CALL_CLOSE}'
    assert not two.accept_string(f"\n{clock}")  # parallel_tool_calls=False: one call
    parallel = compiler.compile_sync(parse_tool_calling([WEATHER, CLOCK], "required", True).grammar_spec())
    assert xgrammar.GrammarMatcher(parallel).accept_string(f"{good}\n{clock}")


def test_generic_rendering_of_tools_and_history():
    calling = parse_tool_calling([WEATHER], "auto", None)
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
    ]
    messages, kwargs = render_history(history, calling, knows_tools=False)
    assert kwargs == {}
    assert messages[0]["role"] == "system" and '"get_weather"' in messages[0]["content"]
    assert messages[2]["content"] == (f'{TOOL_CALL_OPEN}\n{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}'
                                      f"\n{TOOL_CALL_CLOSE}")
    assert "tool_calls" not in messages[2]
    assert messages[3] == {"role": "user", "content": "<tool_response>\n21 C\n</tool_response>"}
    with_system, _ = render_history([{"role": "system", "content": "Be brief."}, *history], calling, False)
    assert with_system[0]["content"].startswith("Be brief.") and len(with_system) == 4


def test_templates_that_know_tools_get_them_natively():
    assert template_knows_tools("{% if tools %}...{% endif %}") and not template_knows_tools("{{ messages }}")
    calling = parse_tool_calling([WEATHER], "required", None)
    history = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]}]
    messages, kwargs = render_history(history, calling, knows_tools=True)
    assert kwargs["tools"][0]["function"]["name"] == "get_weather"
    assert messages[0]["tool_calls"][0]["function"]["arguments"] == {"city": "Rome"}  # HF templates want a dict


def test_the_parser_reads_calls_streamed_or_whole_and_keeps_other_text():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "clock", "arguments": {}}\n</tool_call>')
    names = frozenset({"get_weather", "clock"})
    content, calls = parse_tool_calls(text, names)
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("clock", {})]
    parser, streamed, streamed_calls = ToolCallParser(names), "", []
    for i in range(0, len(text), 3):
        piece, new = parser.feed(text[i:i + 3])
        streamed += piece
        streamed_calls += new
    streamed += parser.finish()
    assert streamed.strip() == "Let me check." and [c["index"] for c in streamed_calls] == [0, 1]
    assert parse_tool_calls("No tools <tool_c", names) == ("No tools <tool_c", [])
    unknown = '<tool_call>{"name": "rm", "arguments": {}}</tool_call>'
    assert parse_tool_calls(unknown, names) == (unknown, [])
