"""Grammar masks in the engine, on a tiny random model: constrained and free requests with
different adapters in one batch; every constrained output parses and validates (or fully
matches its regex), and the free rows are untouched by the masks."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import jsonschema
import pytest

from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.offline import OfflineEngine, OfflineRequest
from loramux.server.structured.compiler import GrammarCompiler
from loramux.server.structured.spec import json_schema_spec, regex_spec
from tests.engine_fixtures import build_core
from tests.peft_adapters import AdapterRecipe, make_peft_adapter
from tests.structured.schemas import REGEXES, SCHEMAS

MAX_TOKENS = 64


@pytest.fixture(scope="module")
def adapters(tiny_chat_model, tmp_path_factory):
    directory, hf = tiny_chat_model
    out = tmp_path_factory.mktemp("adapters")
    return {
        "alpha": make_peft_adapter(hf, AdapterRecipe("alpha", r=8, seed=1, b_std=0.2), out),
        "beta": make_peft_adapter(hf, AdapterRecipe("beta", r=4, seed=2, b_std=0.3), out),
    }


@pytest.fixture(scope="module")
def compiler(smol_tokenizer, tiny_chat_model):
    compiler = GrammarCompiler(smol_tokenizer, len(smol_tokenizer), [smol_tokenizer.eos_token_id])
    yield compiler
    compiler.close()


def test_mixed_batch_constrained_outputs_validate_and_free_rows_are_untouched(
        tiny_chat_model, smol_tokenizer, adapters, compiler):
    core = build_core(tiny_chat_model[0], smol_tokenizer, adapters, max_model_len=512)
    prompt = smol_tokenizer("Answer in JSON:", add_special_tokens=False).input_ids
    free = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    grammars = [("schema", name, compiler.compile_sync(json_schema_spec(s, "response_format"))) for name, s in SCHEMAS.items()]
    grammars += [("regex", name, compiler.compile_sync(regex_spec(r, "grammar"))) for name, r in REGEXES.items()]
    names = ["alpha", "beta", None]
    requests, expected = [], []
    for i, (kind, name, compiled) in enumerate(grammars):
        seeded = i % 2 == 1  # greedy and sampled rows both
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8 if seeded else 0.0, seed=i if seeded else None,
                                grammar=compiled)
        requests.append(OfflineRequest(prompt, params, names[i % 3]))
        expected.append((kind, name))
        requests.append(OfflineRequest(prompt, free, names[(i + 1) % 3]))  # a free row beside each
        expected.append(None)
    results = OfflineEngine(core).generate(requests)
    for result, want, request in zip(results, expected, requests):
        assert result.error is None
        if want is None:
            alone = OfflineEngine(core).generate([replace(request)])[0]
            assert result.token_ids == alone.token_ids  # masks never touch a free row
            continue
        kind, name = want
        assert result.finish_reason.value == "stop", (name, result.text)  # the grammar ended it
        if kind == "schema":
            jsonschema.validate(json.loads(result.text), SCHEMAS[name])
        else:
            assert re.fullmatch(REGEXES[name], result.text), (name, result.text)
    masks = core.runner.grammar_masks
    assert masks.stats.num_tokens > 0 and masks.stats.us_per_token > 0
    assert masks.num_active == 0  # finished requests drop their matchers


def test_a_grammar_changes_what_a_random_model_says(tiny_chat_model, smol_tokenizer, compiler):
    core = build_core(tiny_chat_model[0], smol_tokenizer)
    prompt = smol_tokenizer("Hi", add_special_tokens=False).input_ids
    compiled = compiler.compile_sync(regex_spec(REGEXES["phone"], "grammar"))
    free, constrained = OfflineEngine(core).generate([
        OfflineRequest(prompt, SamplingParams(max_tokens=20, temperature=0.0), None),
        OfflineRequest(prompt, SamplingParams(max_tokens=20, temperature=0.0, grammar=compiled), None),
    ])
    assert not re.fullmatch(REGEXES["phone"], free.text)
    assert re.fullmatch(REGEXES["phone"], constrained.text)
