"""Tool calling on chat: validating `tools` / `tool_choice`, the prompt, the grammar of a
call, and reading calls back out of the generated text.

The call format (Hermes / Qwen style) is the same whatever the template:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template that knows tools (it mentions `tools`) gets them as the `tools` template
variable and the history as HF templates expect it. A template that does not (the default
model's) gets the generic format: the tool list and the call format in the system message,
past calls rendered back as the blocks above and tool results as user turns wrapped in
<tool_response> blocks.

tool_choice "auto" lets the model answer in text or call tools; "required" and a named
function force calls. In every mode but "none" the arguments are constrained to the
function's JSON schema (an xgrammar structural tag), so they always parse and validate.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from loramux.server.structured.spec import STRUCTURAL_TAG, GrammarError, GrammarSpec, canonical_json

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_CALL_PREFIX = '<tool_call>\n{"name": '


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # the arguments' JSON schema

    def openai_json(self) -> dict:
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolCalling:
    """What a chat request asks of tools (tool_choice "none" or no tools: no ToolCalling)."""

    tools: tuple[Tool, ...]
    choice: str  # "auto" | "required" | "named"
    named: str | None = None  # the forced function when choice is "named"
    parallel: bool = True  # more than one call per reply

    def grammar_spec(self) -> GrammarSpec:
        """An xgrammar structural tag: each call's arguments follow the function's schema."""
        callable_tools = [t for t in self.tools if self.named in (None, t.name)]
        tags = [{
            "type": "tag",
            "begin": f"{_CALL_PREFIX}{json.dumps(t.name)}, \"arguments\": ",
            "content": {"type": "json_schema", "json_schema": t.parameters, "max_whitespace_cnt": 1},
            "end": "}\n" + TOOL_CALL_CLOSE,
        } for t in callable_tools]
        if self.choice == "auto":  # text, or calls once the model opens one
            fmt = {"type": "triggered_tags", "triggers": [TOOL_CALL_OPEN], "tags": tags,
                   "stop_after_first": not self.parallel}
        else:  # calls only
            fmt = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
                   "stop_after_first": not self.parallel}
        return GrammarSpec(STRUCTURAL_TAG, canonical_json({"type": "structural_tag", "format": fmt}), "tools")

    def names(self) -> frozenset[str]:
        return frozenset(t.name for t in self.tools)


def parse_tool_calling(tools: list[dict] | None, tool_choice: Any, parallel_tool_calls: bool | None) -> ToolCalling | None:
    """Validate the request's tool fields; None when no tool may be called."""
    if tool_choice is not None and not tools:
        if tool_choice == "none":
            return None
        raise GrammarError("tool_choice needs tools", "tool_choice")
    if not tools:
        return None
    if len(tools) > MAX_TOOLS:
        raise GrammarError(f"at most {MAX_TOOLS} tools per request", "tools")
    parsed = tuple(_tool(i, t) for i, t in enumerate(tools))
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        raise GrammarError("tools: function names must be unique", "tools")
    parallel = True if parallel_tool_calls is None else bool(parallel_tool_calls)
    if tool_choice is None or tool_choice == "auto":
        return ToolCalling(parsed, "auto", parallel=parallel)
    if tool_choice == "none":
        return None
    if tool_choice == "required":
        return ToolCalling(parsed, "required", parallel=parallel)
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if name not in names:
            raise GrammarError(f"tool_choice names function {name!r}, which is not in tools", "tool_choice")
        return ToolCalling(parsed, "named", named=name, parallel=parallel)
    raise GrammarError('tool_choice must be "none", "auto", "required" or {"type": "function", '
                       '"function": {"name": ...}}', "tool_choice")


def _tool(index: int, tool: Any) -> Tool:
    where = f"tools[{index}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise GrammarError(f'{where} must be {{"type": "function", "function": {{...}}}}', "tools")
    function = tool["function"]
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise GrammarError(f"{where}.function.name must be 1-64 letters, digits, _ . or -", "tools")
    description = function.get("description") or ""
    if not isinstance(description, str):
        raise GrammarError(f"{where}.function.description must be a string", "tools")
    parameters = function.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise GrammarError(f"{where}.function.parameters must be a JSON schema object", "tools")
    return Tool(name, description, parameters)


# --------------------------------------------------------------------------- the prompt


GENERIC_INSTRUCTIONS = """You can call these functions:
{functions}

To call functions, reply with one block per call, exactly like this:
<tool_call>
{{"name": "<function name>", "arguments": <the arguments as a JSON object>}}
</tool_call>
Results come back in <tool_response> blocks. When no function is needed, answer normally."""


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def render_history(messages: list[dict], calling: ToolCalling | None, knows_tools: bool) -> tuple[list[dict], dict]:
    """Messages (tool_calls, tool results) and extra template variables for the chat template."""
    if knows_tools:
        rendered = [_native_message(m) for m in messages]
        return rendered, ({"tools": [t.openai_json() for t in calling.tools]} if calling else {})
    rendered = [_generic_message(m) for m in messages]
    if calling is not None:
        functions = "\n".join(
            json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters})
            for t in calling.tools)
        text = GENERIC_INSTRUCTIONS.format(functions=functions)
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {**rendered[0], "content": f"{rendered[0]['content']}\n\n{text}"}
        else:
            rendered.insert(0, {"role": "system", "content": text})
    return rendered, {}


def _arguments(call: dict) -> Any:
    arguments = (call.get("function") or {}).get("arguments", {})
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def _native_message(message: dict) -> dict:
    if not message.get("tool_calls"):
        return message
    calls = [{**c, "function": {**(c.get("function") or {}), "arguments": _arguments(c)}} for c in message["tool_calls"]]
    return {**message, "tool_calls": calls}


def _generic_message(message: dict) -> dict:
    message = dict(message)
    calls = message.pop("tool_calls", None)
    if message["role"] == "tool":
        message.pop("tool_call_id", None)
        return {"role": "user", "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"}
    if calls:
        blocks = [
            f"{TOOL_CALL_OPEN}\n"
            + json.dumps({"name": (c.get("function") or {}).get("name"), "arguments": _arguments(c)})
            + f"\n{TOOL_CALL_CLOSE}"
            for c in calls
        ]
        message["content"] = "\n".join(([message["content"]] if message.get("content") else []) + blocks)
    return message


def check_history(messages: list[dict]) -> None:
    """tool_calls of assistant messages must have the OpenAI shape."""
    for i, message in enumerate(messages):
        calls = message.get("tool_calls")
        if calls is None:
            continue
        if message["role"] != "assistant":
            raise GrammarError(f"messages[{i}].tool_calls is only valid on assistant messages", "messages")
        for j, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise GrammarError(f"messages[{i}].tool_calls[{j}].function.name must be a string", "messages")
            if not isinstance(function.get("arguments", "{}"), (str, dict)):
                raise GrammarError(f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON string",
                                   "messages")


# --------------------------------------------------------------------------- the output


class ToolCallParser:
    """Generated text -> content and tool calls, fed incrementally (streams) or at once.

    Text that may be the start of a <tool_call> block is held back until it is known;
    whitespace between calls is not content. A block that does not parse as a call of a
    known function stays content.
    """

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self.calls: list[dict] = []
        self._buffer = ""
        self._in_call = False
        self._held_space = ""  # whitespace, emitted only if more content follows

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """New text -> (content delta, new calls)."""
        self._buffer += text
        content, new_calls = [], []
        while True:
            if not self._in_call:
                start = self._buffer.find(TOOL_CALL_OPEN)
                if start < 0:
                    keep = _partial_suffix(self._buffer, TOOL_CALL_OPEN)
                    content.append(self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    break
                content.append(self._buffer[:start])
                self._buffer = self._buffer[start + len(TOOL_CALL_OPEN):]
                self._in_call = True
            else:
                end = self._buffer.find(TOOL_CALL_CLOSE)
                if end < 0:
                    break
                body, self._buffer = self._buffer[:end], self._buffer[end + len(TOOL_CALL_CLOSE):]
                self._in_call = False
                call = self._call(body)
                if call is None:
                    content.append(TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE)
                else:
                    new_calls.append(call)
        return self._content("".join(content)), new_calls

    def finish(self) -> str:
        """The end of the text: whatever was held back is content (an unclosed block too)."""
        rest = (TOOL_CALL_OPEN if self._in_call else "") + self._buffer
        self._buffer, self._in_call = "", False
        return self._content(rest, final=True)

    def _content(self, text: str, final: bool = False) -> str:
        """Whitespace-only pieces wait for more content (between calls they are dropped)."""
        if text.strip():
            text, self._held_space = self._held_space + text, ""
            return text
        self._held_space += text
        if final and not self.calls:
            text, self._held_space = self._held_space, ""
            return text
        return ""

    def _call(self, body: str) -> dict | None:
        try:
            parsed = json.loads(body)
        except ValueError:
            return None
        if not isinstance(parsed, dict) or parsed.get("name") not in self.names:
            return None
        arguments = parsed.get("arguments", {})
        call = {
            "index": len(self.calls),
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": parsed["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
        }
        self.calls.append(call)
        return call


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def parse_tool_calls(text: str, names: frozenset[str]) -> tuple[str | None, list[dict]]:
    """A whole reply -> (content or None, calls without their stream index)."""
    parser = ToolCallParser(names)
    content, _ = parser.feed(text)
    content += parser.finish()
    calls = [{k: v for k, v in c.items() if k != "index"} for c in parser.calls]
    if calls:
        return (content.strip() or None), calls
    return content, calls
