"""Choices of one request: a failed choice cancels its siblings (no model needed)."""

from __future__ import annotations

import asyncio
import time

import pytest

from loramux.server.api.openai import _merged, _run_all
from loramux.server.service import GenerationFailed


class _FailingChoiceService:
    """Choice 1 fails after 10 ms; the others would run for 30 s unless cancelled."""

    def __init__(self) -> None:
        self.cancelled: list[int] = []

    async def stream(self, generation, request_id, admission):
        index = int(request_id.rsplit("-", 1)[1])
        try:
            if index == 1:
                await asyncio.sleep(0.01)
                raise GenerationFailed("choice 1 failed")
            await asyncio.sleep(30)
            yield None
        except asyncio.CancelledError:
            self.cancelled.append(index)
            raise


def test_a_failed_choice_cancels_its_siblings():
    service = _FailingChoiceService()

    async def run():
        started = time.perf_counter()
        with pytest.raises(GenerationFailed):
            await _run_all(service, [object()] * 4, "req", admission=None)
        return time.perf_counter() - started

    elapsed = asyncio.run(run())
    assert elapsed < 5
    assert sorted(service.cancelled) == [0, 2, 3]


def test_a_failed_streaming_choice_cancels_its_siblings():
    service = _FailingChoiceService()

    async def run():
        with pytest.raises(GenerationFailed):
            async for _ in _merged(service, [object()] * 3, "req", admission=None):
                pass
        await asyncio.sleep(0.05)  # the cancelled tasks run their handlers

    asyncio.run(run())
    assert sorted(service.cancelled) == [0, 2]
