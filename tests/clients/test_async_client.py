"""AsyncClient against the fake server: the same answers as the blocking client."""

from __future__ import annotations

import asyncio

import pytest

from loramux.clients import AsyncClient, AuthenticationError, NotFoundError, ServerError


def run(coro):
    return asyncio.run(coro)


def test_async_generate_and_concurrency(url, fake):
    fake.add_adapter("a")

    async def main():
        async with AsyncClient(url) as client:
            return await asyncio.gather(client.generate("x y", max_new_tokens=2),
                                        client.generate("x", adapter_id="a", max_new_tokens=1))

    base, tuned = run(main())
    assert base.text == " base0 base1" and base.prompt_tokens == 2 and base.finish_reason == "length"
    assert tuned.text == " a0" and tuned.request_id != base.request_id


def test_async_generate_stream(url):
    async def main():
        async with AsyncClient(url) as client:
            return [e async for e in client.generate_stream("hi", max_new_tokens=5)]

    events = run(main())
    assert len(events) == 5 and events[-1].result.text == "".join(e.text for e in events)
    assert events[-1].result.generated_tokens == 5


def test_async_chat_and_stream(url):
    async def main():
        async with AsyncClient(url) as client:
            result = await client.chat("hi", max_tokens=2)
            deltas = [d async for d in await client.chat("hi", stream=True, max_tokens=2)]
            return result, deltas

    result, deltas = run(main())
    assert result.text == " base0 base1" and result.usage.completion_tokens == 2
    assert "".join(d.text for d in deltas) == result.text and deltas[-1].usage.total_tokens == 7


def test_async_adapters(url, fake, adapter_dir):
    async def main():
        async with AsyncClient(url, api_key="k") as client:
            uploaded = await client.upload_adapter("up", adapter_dir)
            pinned = await client.pin_adapter("up")
            unpinned = await client.unpin_adapter("up")
            listed = await client.list_adapters()
            shown = await client.get_adapter("up")
            await client.delete_adapter("up")
            with pytest.raises(NotFoundError):
                await client.get_adapter("up")
            return uploaded, pinned, unpinned, listed, shown, await client.models(), await client.health()

    fake.admin_key = "k"
    uploaded, pinned, unpinned, listed, shown, models, healthy = run(main())
    assert uploaded.rank == 4 and pinned.pinned and not unpinned.pinned
    assert [a.id for a in listed] == ["up"] and shown.id == "up"
    assert [m.id for m in models] == ["fake-base"] and healthy is True
    assert fake.uploads["up"][1] == (adapter_dir / "adapter_model.safetensors").read_bytes()


def test_async_errors(url, fake):
    fake.admin_key = "k"

    async def main():
        async with AsyncClient(url, api_key="wrong") as client:
            with pytest.raises(AuthenticationError):
                await client.generate("hi")
        async with AsyncClient(url, api_key="k") as client:
            with pytest.raises(ServerError, match="the generation failed"):
                async for _ in client.generate_stream("fail-mid-stream"):
                    pass

    run(main())
