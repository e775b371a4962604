"""The correctness suite's grammars: JSON schemas (nested objects, arrays, enums, required
fields, bounded numbers, patterned strings) and regexes. Strings are bounded so that even a
random model finishes them within a few dozen tokens."""

from __future__ import annotations

SCHEMAS = {
    "flat_required": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"}},
        "required": ["name", "ok"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                               "tag": {"type": "string", "maxLength": 6}},
                "required": ["id", "tag"],
            },
        },
        "required": ["user"],
    },
    "array_enum": {
        "type": "object",
        "properties": {
            "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        },
        "required": ["colors"],
    },
    "bounded_numbers": {
        "type": "object",
        "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 99},
                       "score": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["age", "score"],
    },
    "patterned_string": {
        "type": "object",
        "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                       "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2}$"}},
        "required": ["zip", "code"],
    },
}

REGEXES = {
    "phone": r"\d{3}-\d{3}-\d{4}",
    "yes_no": r"(yes|no)",
    "date": r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9])",
}
