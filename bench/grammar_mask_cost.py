"""Per-token grammar mask cost of llguidance and xgrammar on the default model's tokenizer.

How the engine was chosen (server/structured/): for a few JSON schemas and a regex, a valid
answer is tokenized and replayed through each engine's matcher; each step fills one row of
a token bitmask and then accepts the token. Reported: the tokenizer set-up, the compile time
(cold) and the mean microseconds per token of fill + accept. Both packages are only needed
for this comparison: `pip install -e .[grammar-bench]` adds llguidance.

    python -m bench.grammar_mask_cost [--model DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from loramux.server.model_fetch import default_model_dir

CASES = [
    (
        "person",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "pattern": "^[A-Z][a-z]+$"},
                "age": {"type": "integer", "minimum": 0, "maximum": 130},
                "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}},
                "address": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"],
                },
            },
            "required": ["name", "age", "tags", "address"],
        },
        {"name": "Alice", "age": 31, "tags": ["a", "c"], "address": {"city": "Paris", "zip": "75001"}},
    ),
    ("any_object", {"type": "object"}, {"k": [1, 2.5, "x", None, True], "nested": {"deep": "value text here"}}),
]
REGEX = (r"\d{3}-\d{3}-\d{4}", "555-123-4567")


def _trace(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def measure_llguidance(tokenizer, vocab: int, repeats: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    started = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    setup_s = time.perf_counter() - started
    grammars = [(n, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(s)), json.dumps(v))
                for n, s, v in CASES]
    grammars.append(("regex", llguidance.LLMatcher.grammar_from_regex(REGEX[0]), REGEX[1]))
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)
    return _run(
        grammars, tokenizer, repeats, setup_s,
        make=lambda g: llguidance.LLMatcher(lltok, g),
        fill=lambda m: llguidance.torch.fill_next_token_bitmask(m, bitmask, 0),
        accept=lambda m, t: m.consume_token(t),
        ok=lambda m: not m.is_error(),
    )


def measure_xgrammar(tokenizer, vocab: int, repeats: int) -> dict:
    import xgrammar

    started = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
    setup_s = time.perf_counter() - started
    grammars = [(n, ("json", json.dumps(s)), json.dumps(v)) for n, s, v in CASES]
    grammars.append(("regex", ("regex", REGEX[0]), REGEX[1]))
    bitmask = xgrammar.allocate_token_bitmask(1, vocab)

    def make(spec):
        kind, text = spec
        compiled = compiler.compile_json_schema(text) if kind == "json" else compiler.compile_regex(text)
        return xgrammar.GrammarMatcher(compiled)

    return _run(
        grammars, tokenizer, repeats, setup_s,
        make=make,
        fill=lambda m: m.fill_next_token_bitmask(bitmask, 0),
        accept=lambda m, t: m.accept_token(t),
        ok=lambda m: True,
    )


def _run(grammars, tokenizer, repeats, setup_s, make, fill, accept, ok) -> dict:
    result = {"tokenizer_setup_ms": round(setup_s * 1e3, 1), "cases": {}}
    per_token_all = []
    for name, grammar, answer in grammars:
        tokens = _trace(tokenizer, answer)
        compile_ms, per_token = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            matcher = make(grammar)
            compile_ms.append((time.perf_counter() - started) * 1e3)
            started = time.perf_counter()
            for t in tokens:
                fill(matcher)
                accept(matcher, t)
            per_token.append((time.perf_counter() - started) * 1e6 / len(tokens))
            if not ok(matcher):
                raise RuntimeError(f"{name}: the replayed answer was refused")
        result["cases"][name] = {
            "tokens": len(tokens),
            "compile_ms_first": round(compile_ms[0], 2),
            "mask_us_per_token": round(statistics.median(per_token), 1),
        }
        per_token_all.append(statistics.median(per_token))
    result["mask_us_per_token_mean"] = round(statistics.mean(per_token_all), 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    vocab = len(tokenizer)
    report = {
        "llguidance": measure_llguidance(tokenizer, vocab, args.repeats),
        "xgrammar": measure_xgrammar(tokenizer, vocab, args.repeats),
    }
    print(json.dumps(report, indent=1))
    print("grammar-mask-cost: " + " ".join(
        f"{name}_us_per_token={r['mask_us_per_token_mean']} {name}_setup_ms={r['tokenizer_setup_ms']}"
        for name, r in report.items()
    ))


if __name__ == "__main__":
    main()
