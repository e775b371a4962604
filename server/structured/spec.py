"""What a request asks its output to look like, read from each API's fields.

OpenAI: `response_format` {"type": "text" | "json_object" | "json_schema"} and vLLM's
`structured_outputs` {"json" | "regex"}; LoRAX: `parameters.response_format`
{"type": "json_object", "schema": ...}; TGI: `parameters.grammar` {"type": "json" |
"regex", "value": ...}. Every shape becomes one `GrammarSpec`; bad shapes raise
`GrammarError` naming the field.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any


class GrammarError(ValueError):
    """A grammar field is malformed, too large or cannot be compiled; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


JSON_SCHEMA = "json_schema"
REGEX = "regex"
STRUCTURAL_TAG = "structural_tag"  # xgrammar's structural tag (tool calls)
KINDS = (JSON_SCHEMA, REGEX, STRUCTURAL_TAG)
ANY_JSON_OBJECT = {"type": "object"}
# Repetition bounds are unrolled by the grammar compiler: minLength 10**8 takes seconds of
# CPU. Larger counts than this cannot fit any context anyway.
MAX_SCHEMA_COUNT = 10_000
_COUNT_KEYS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties")


@dataclass(frozen=True)
class GrammarSpec:
    kind: str  # one of KINDS
    text: str  # canonical JSON for schemas and tags; the pattern for regexes
    param: str  # the request field it came from (for errors); not part of the identity
    strict: bool = True  # JSON schemas: no properties or items beyond what the schema names

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind

    @property
    def key(self) -> str:
        """Cache key: equal grammars (whatever field or key order they came in) share it."""
        return hashlib.sha256(f"{self.kind}\0{int(self.strict)}\0{self.text}".encode()).hexdigest()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def json_schema_spec(schema: Any, param: str, strict: bool = True) -> GrammarSpec:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise GrammarError(f"{param}: the schema is not valid JSON: {exc}", param) from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"{param}: a JSON schema must be an object", param)
    _check_counts(schema, param)
    return GrammarSpec(JSON_SCHEMA, canonical_json(schema), param, strict)


def _check_counts(node: Any, param: str) -> None:
    """Refuse repetition bounds above MAX_SCHEMA_COUNT anywhere in the schema."""
    stack = [node]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key in _COUNT_KEYS:
                value = node.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value > MAX_SCHEMA_COUNT:
                    raise GrammarError(f"{param}: {key}={value} exceeds {MAX_SCHEMA_COUNT}", param)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def regex_spec(pattern: Any, param: str) -> GrammarSpec:
    if not isinstance(pattern, str) or not pattern:
        raise GrammarError(f"{param}: a regex must be a non-empty string", param)
    return GrammarSpec(REGEX, pattern, param)


def from_response_format(response_format: dict | None, param: str = "response_format") -> GrammarSpec | None:
    """OpenAI's and LoRAX's `response_format` (None or type "text": free output)."""
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        # LoRAX puts an optional schema beside the type; OpenAI's json_object is any object.
        schema = response_format.get("schema")
        return json_schema_spec(ANY_JSON_OBJECT if schema is None else schema, f"{param}.schema")
    if kind == "json_schema":
        body = response_format.get("json_schema")
        if not isinstance(body, dict) or "schema" not in body:
            raise GrammarError(f"{param}.json_schema.schema is required for type json_schema",
                               f"{param}.json_schema")
        strict = body.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise GrammarError(f"{param}.json_schema.strict must be a boolean", f"{param}.json_schema.strict")
        return json_schema_spec(body["schema"], f"{param}.json_schema.schema", strict is not False)
    raise GrammarError(f"{param}.type must be text, json_object or json_schema, not {kind!r}", f"{param}.type")


def from_tgi_grammar(grammar: dict | None, param: str = "grammar") -> GrammarSpec | None:
    """TGI's `grammar`: {"type": "json" | "json_object", "value": schema} or {"type": "regex", "value": str}."""
    if not grammar:
        return None
    kind, value = grammar.get("type"), grammar.get("value")
    if kind in ("json", "json_object"):
        return json_schema_spec(ANY_JSON_OBJECT if value is None else value, f"{param}.value")
    if kind == "regex":
        return regex_spec(value, f"{param}.value")
    raise GrammarError(f"{param}.type must be json or regex, not {kind!r}", f"{param}.type")


def from_structured_outputs(fields: dict | None, param: str = "structured_outputs") -> GrammarSpec | None:
    """vLLM's extra body field: {"json": schema} or {"regex": pattern} (one of them)."""
    if not fields:
        return None
    named = [k for k in ("json", "regex") if fields.get(k) is not None]
    unknown = sorted(set(fields) - {"json", "regex"})
    if unknown:
        raise GrammarError(f"{param}: unsupported key(s) {unknown}; use json or regex", param)
    if len(named) != 1:
        raise GrammarError(f"{param} needs exactly one of json or regex", param)
    if named[0] == "json":
        return json_schema_spec(fields["json"], f"{param}.json")
    return regex_spec(fields["regex"], f"{param}.regex")


def one_of(*specs: GrammarSpec | None) -> GrammarSpec | None:
    """At most one way of constraining a request."""
    given = [s for s in specs if s is not None]
    if len(given) > 1:
        raise GrammarError(f"{given[0].param} and {given[1].param} cannot be combined: name one grammar",
                           given[1].param)
    return given[0] if given else None
