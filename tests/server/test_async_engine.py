"""The threaded engine seen from asyncio: concurrent streams, cancellation frees resources."""

from __future__ import annotations

import asyncio

import pytest

from loramux.scheduler.request import FinishReason
from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.engine import AsyncEngine
from loramux.server.offline import OfflineEngine, OfflineRequest
from tests.engine_fixtures import build_core

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture()
def core(tiny_chat_model, smol_tokenizer):
    return build_core(tiny_chat_model[0], smol_tokenizer)


def test_concurrent_streams_and_cancellation(core, smol_tokenizer):
    ids = [smol_tokenizer(t, add_special_tokens=False).input_ids for t in ("First prompt", "Second one here")]
    expected = OfflineEngine(core).generate([OfflineRequest(i, SamplingParams(max_tokens=10, **GREEDY)) for i in ids])
    free_blocks = core.scheduler.kv_cache.num_free_blocks

    async def scenario():
        engine = AsyncEngine(core)
        engine.start()
        try:
            async def collect(request_id, prompt_ids):
                tokens, text, last = [], "", None
                async for out in engine.generate(request_id, prompt_ids, SamplingParams(max_tokens=10, **GREEDY)):
                    tokens += out.new_token_ids
                    text += out.new_text
                    last = out
                return tokens, text, last

            async def cancel_early():
                stream = engine.generate("cancelled", ids[0], SamplingParams(max_tokens=500, **GREEDY))
                async for out in stream:
                    if out.new_token_ids:
                        break  # the consumer goes away: the request must be aborted
                await stream.aclose()

            results = await asyncio.gather(collect("a", ids[0]), collect("b", ids[1]), cancel_early())
            for _ in range(200):  # the abort lands at the engine's next look
                if not core.has_unfinished_requests():
                    break
                await asyncio.sleep(0.01)
            return results
        finally:
            engine.shutdown()

    (a_tokens, a_text, a_last), (b_tokens, _, _), _ = asyncio.run(scenario())
    assert a_tokens == expected[0].token_ids and a_text == expected[0].text
    assert b_tokens == expected[1].token_ids
    assert a_last.finished and a_last.finish_reason is FinishReason.LENGTH
    assert not core.has_unfinished_requests()
    assert core.scheduler.kv_cache.num_free_blocks == free_blocks


def test_bad_request_fails_alone(core, smol_tokenizer):
    async def scenario():
        engine = AsyncEngine(core)
        engine.start()
        try:
            too_long = list(range(5, 5 + core.max_model_len + 10))
            with pytest.raises(ValueError, match="max_model_len"):
                async for _ in engine.generate("too-long", too_long, SamplingParams(max_tokens=4)):
                    pass
            tokens = []
            async for out in engine.generate("fine", [5, 6, 7], SamplingParams(max_tokens=4, **GREEDY)):
                tokens += out.new_token_ids
            return tokens
        finally:
            engine.shutdown()

    assert len(asyncio.run(scenario())) == 4
