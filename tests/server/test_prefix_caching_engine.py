"""Prefix caching through the real engine (fp32, greedy): the same tokens with and without it.

Mixed batches of base and adapter requests share one long system prompt, then come back for
a second turn that resends the first turn's prompt and answer. With caching on, the runner
starts those prefills at num_computed_tokens > 0 and attends to KV blocks another request
(or turn) filled; the outputs must equal caching off token for token, and a prefix computed
under one adapter is never served to another (the adapters change K and V, so the outputs
would differ if it were).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.offline import OfflineEngine, OfflineRequest
from tests.engine_fixtures import build_core, default_model_or_skip
from tests.peft_adapters import AdapterRecipe, make_peft_adapter

SYSTEM = (
    "You are a careful assistant for a small hardware shop. Answer in one short sentence, "
    "name the aisle when you know it, and never invent prices. The shop sells screws, nails, "
    "hinges, paint, brushes, ladders, glue and tape. "
)
QUESTIONS = ["Where are the hinges?", "Do you sell glue?", "What about ladders?", "Any blue paint?"]


@pytest.fixture(scope="module")
def adapters(tiny_chat_model, tmp_path_factory):
    _, hf = tiny_chat_model
    out = tmp_path_factory.mktemp("prefix-adapters")
    return {
        "alpha": make_peft_adapter(hf, AdapterRecipe("alpha", r=8, seed=11, b_std=0.2), out),
        "beta": make_peft_adapter(hf, AdapterRecipe("beta", r=4, target_modules=["k_proj", "v_proj"], seed=12, b_std=0.3), out),
    }


def two_turns(core, tokenizer, max_tokens: int, adapters=(None, "alpha", "beta")) -> list[list[int]]:
    """Turn 1: every (question, adapter) at once; turn 2: each resends its turn + a follow-up."""
    engine = OfflineEngine(core)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    system = tokenizer(SYSTEM, add_special_tokens=False).input_ids
    first = [
        (system + tokenizer(q, add_special_tokens=False).input_ids, adapter)
        for q in QUESTIONS
        for adapter in adapters
    ]
    results = engine.generate([OfflineRequest(ids, params, adapter) for ids, adapter in first])
    follow = tokenizer(" And where is the tape?", add_special_tokens=False).input_ids
    second = [(ids + r.token_ids + follow, adapter) for (ids, adapter), r in zip(first, results)]
    results += engine.generate([OfflineRequest(ids, params, adapter) for ids, adapter in second])
    for r in results:
        assert r.error is None, r.error
    return [list(r.token_ids) for r in results]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(long_prefill_token_threshold=24, max_num_batched_tokens=96),  # chunked prefill
        dict(num_kv_blocks=20, max_model_len=128, max_num_seqs=6),  # tight pool: eviction and preemption
    ],
    ids=["plain", "chunked", "tight"],
)
def test_outputs_identical_with_and_without_prefix_caching(tiny_chat_model, smol_tokenizer, adapters, overrides):
    model_dir = tiny_chat_model[0]
    on = build_core(model_dir, smol_tokenizer, adapters, block_size=8, **overrides)
    off = build_core(model_dir, smol_tokenizer, adapters, block_size=8, enable_prefix_caching=False, **overrides)
    with_cache = two_turns(on, smol_tokenizer, max_tokens=6)
    without = two_turns(off, smol_tokenizer, max_tokens=6)
    assert with_cache == without
    stats = on.scheduler.prefix_cache_stats.snapshot()
    assert {"base", "alpha", "beta"} <= stats.keys()
    assert all(stats[a].hits > 0 for a in ("base", "alpha", "beta"))  # the cache was used
    assert off.scheduler.prefix_cache_stats.snapshot() == {}
    # Adapters change the outputs, so a prefix served across adapters would have shown.
    assert with_cache[0] != with_cache[1] or with_cache[0] != with_cache[2]


EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "adapters"


@pytest.mark.slow  # minutes on 2 shared cores; the tiny model covers the same in the default suite
def test_default_model_identical_with_and_without_prefix_caching(smol_tokenizer):
    model_dir = default_model_or_skip()
    demo = {name: EXAMPLES / name for name in ("pirate", "french")}
    on = build_core(model_dir, smol_tokenizer, demo, block_size=16)
    off = build_core(model_dir, smol_tokenizer, demo, block_size=16, enable_prefix_caching=False)
    names = (None, "pirate", "french")
    assert two_turns(on, smol_tokenizer, 4, names) == two_turns(off, smol_tokenizer, 4, names)
    assert all(c.hits > 0 for c in on.scheduler.prefix_cache_stats.snapshot().values())
