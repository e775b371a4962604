"""Per-request adapter strength (`adapter_scale`) on a tiny random model in fp32: 0 is the
base model, 1 the adapter as trained, and strengths of one adapter share a batch as
segments of their own, each giving what it gives alone."""

from __future__ import annotations

import pytest

from loramux.kernels.metadata import NO_ADAPTER
from loramux.scheduler.output import SchedulerOutput
from loramux.scheduler.request import Request
from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.offline import OfflineEngine, OfflineRequest
from tests.engine_fixtures import build_core
from tests.peft_adapters import AdapterRecipe, make_peft_adapter

MAX_TOKENS = 10
PROMPT = "The quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire"


@pytest.fixture(scope="module")
def adapters(tiny_chat_model, tmp_path_factory):
    directory, hf = tiny_chat_model
    out = tmp_path_factory.mktemp("scale-adapters")
    return {"alpha": make_peft_adapter(hf, AdapterRecipe("alpha", r=8, seed=1, b_std=0.3), out)}


@pytest.fixture()
def core(tiny_chat_model, smol_tokenizer, adapters):
    return build_core(tiny_chat_model[0], smol_tokenizer, adapters)


@pytest.fixture()
def ids(smol_tokenizer) -> list[int]:
    return smol_tokenizer(PROMPT, add_special_tokens=False).input_ids


def params(scale: float | None = None) -> SamplingParams:
    extra = {} if scale is None else {"adapter_scale": scale}
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, **extra)


def run(core, requests: list[tuple[str | None, float | None]], ids: list[int]) -> list[list[int]]:
    results = OfflineEngine(core).generate([OfflineRequest(ids, params(s), a) for a, s in requests])
    return [r.token_ids for r in results]


def test_scale_zero_is_the_base_model_and_one_is_the_adapter(core, ids):
    [base] = run(core, [(None, None)], ids)
    [adapter] = run(core, [("alpha", None)], ids)
    assert base != adapter  # the adapter changes this prompt's tokens at all
    assert run(core, [("alpha", 0.0)], ids) == [base]
    assert run(core, [("alpha", 1.0)], ids) == [adapter]


def test_mixed_strengths_in_one_batch_match_each_alone(tiny_chat_model, smol_tokenizer, adapters, ids):
    mix = [("alpha", 0.5), (None, None), ("alpha", 1.0), ("alpha", 2.0), ("alpha", 0.0), ("alpha", 0.5)]
    solo = build_core(tiny_chat_model[0], smol_tokenizer, adapters)
    alone = [run(solo, [r], ids)[0] for r in mix]  # one after the other: each alone in its batch
    together = run(build_core(tiny_chat_model[0], smol_tokenizer, adapters), mix, ids)
    assert together == alone
    half, base, full, double = alone[0], alone[1], alone[2], alone[3]
    assert len({tuple(half), tuple(base), tuple(full), tuple(double)}) == 4  # each strength is its own model


def test_segments_split_where_the_scale_changes(core, ids):
    requests = []  # alpha sits in slot 0 (build_core writes the adapters in order)
    blocks_each = -(-len(ids) // 16)
    for i, (name, scale) in enumerate((("a", 0.5), ("b", 1.0), ("c", 0.5), ("d", 0.0))):
        r = Request(name, list(ids), params(scale), adapter_id="alpha")
        r.adapter_slot = 0
        r.block_ids = list(range(i * blocks_each, (i + 1) * blocks_each))
        requests.append(r)
    step = core.runner.prepare(SchedulerOutput(requests, [len(ids)] * 4, 4 * len(ids)))
    info = step.batch.lora
    # Sorted by (slot, scale): the base-like scale-0 row first, then alpha at 0.5 (two
    # requests, one segment) and alpha at 1.0.
    assert info.slot_indices_host == (NO_ADAPTER, 0, 0)
    assert info.seg_scales_host == (1.0, 0.5, 1.0)
    assert info.seg_indptr_host == (0, len(ids), 3 * len(ids), 4 * len(ids))


def test_a_cached_prefix_is_never_shared_across_strengths(tiny_chat_model, smol_tokenizer, adapters, ids):
    fresh = run(build_core(tiny_chat_model[0], smol_tokenizer, adapters), [("alpha", 0.5)], ids)
    core = build_core(tiny_chat_model[0], smol_tokenizer, adapters)
    run(core, [("alpha", 1.0)], ids)  # fills the prefix cache under the full-strength adapter
    assert run(core, [("alpha", 0.5)], ids) == fresh
    assert run(core, [("alpha", 0.0)], ids) == run(core, [(None, None)], ids)


class _Store:
    """store.info(...).use_dora for two adapters; unknown ids raise as the store does."""

    def info(self, adapter_id):
        from types import SimpleNamespace

        from loramux.adapter_store.errors import AdapterNotFound

        if adapter_id not in ("dora", "plain"):
            raise AdapterNotFound(adapter_id, None, "no such adapter")
        return SimpleNamespace(use_dora=adapter_id == "dora")


def test_a_dora_adapter_cannot_be_scaled():
    """DoRA's magnitudes normalize the delta at full strength: a scaled DoRA adapter is not
    what peft computes, so adapter_scale != 1 on one is a 400 naming the field."""
    from types import SimpleNamespace

    from loramux.server.service import GenerationService, InvalidRequest

    service = GenerationService.__new__(GenerationService)
    service.parts = SimpleNamespace(store=_Store())
    assert service.adapter_scale(0.5, "plain") == 0.5
    assert service.adapter_scale(None, "dora") == 1.0
    assert service.adapter_scale(1.0, "dora") == 1.0
    for scale in (0.0, 0.5, 2.0):
        with pytest.raises(InvalidRequest) as refused:
            service.adapter_scale(scale, "dora")
        assert refused.value.param == "adapter_scale" and "DoRA" in str(refused.value)
    with pytest.raises(InvalidRequest):
        service.adapter_scale(0.5, None)
    assert service.adapter_scale(0.5, "unknown") == 0.5  # its own 404 comes from the adapter check


def test_a_request_whose_adapter_went_away_while_it_queued_is_a_404_even_if_uploaded_again():
    """Deleted while queued, then uploaded again before the failure is looked at: the request
    found its adapter gone (version 1 left, version 2 came later), which is the client's 404,
    not a server error."""
    import asyncio
    import itertools
    from types import SimpleNamespace

    from loramux.scheduler.request import FinishReason
    from loramux.server.service import Generation, GenerationService, UnknownAdapter

    versions = iter([1, 2])  # at admission; when the failure is looked at
    timer = SimpleNamespace(tokens=lambda n: None, finish=lambda *a: None)

    async def generate(request_id, prompt, params, adapter_id):
        yield SimpleNamespace(new_token_ids=[], num_output_tokens=0, finished=True,
                              finish_reason=FinishReason.ERROR, error="unknown adapter 'a'")

    service = GenerationService.__new__(GenerationService)
    service.parts = SimpleNamespace(store=SimpleNamespace(info=lambda a: SimpleNamespace(version=next(versions))))
    service.metrics = SimpleNamespace(start_request=lambda *a: timer)
    service.engine = SimpleNamespace(generate=generate)
    service._engine_ids = itertools.count()
    admission = SimpleNamespace(release_one=lambda: None)

    async def run():
        async for _ in service.stream(Generation([1, 2], None, "a", "chat"), "r", admission):
            pass

    with pytest.raises(UnknownAdapter):
        asyncio.run(run())
