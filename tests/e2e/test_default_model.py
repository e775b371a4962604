"""The default model (SmolLM2-135M-Instruct) served for real, through the `openai` package.

No API keys here (the open configuration); a random PEFT adapter made with peft on the
real model. Outputs must equal the offline engine's greedy outputs.
"""

from __future__ import annotations

import asyncio

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from loramux.server.model_fetch import default_model_dir
from tests.e2e.conftest import MAX_LORA_RANK, build_reference, start_server, stop_server
from tests.peft_adapters import AdapterRecipe, make_peft_adapter

pytestmark = [pytest.mark.model, pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")]

NAME = "smollm2"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 12
KV_BYTES = 128 << 20


@pytest.fixture(scope="module")
def smol_adapters(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("smol-adapters")
    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    make_peft_adapter(model, AdapterRecipe("smol-lora", r=8, seed=11, b_std=0.05), directory)
    del model
    return directory


@pytest.fixture(scope="module")
def smol_server(smol_adapters, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("e2e-logs") / "smol-server.log"
    server = start_server([
        "--model", str(default_model_dir()), "--served-model-name", NAME, "--adapter-dir", str(smol_adapters),
        "--upload-dir", str(log_path.parent / "uploads"), "--max-loras", "2", "--max-lora-rank", str(MAX_LORA_RANK),
        "--kv-cache-bytes", "128M", "--max-model-len", "1024", "--threads", "2", "--log-level", "warning",
    ], log_path)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def smol_expected(smol_adapters):
    reference = build_reference(default_model_dir(), (smol_adapters,), NAME, KV_BYTES)
    try:
        ids = reference.chat_ids(MESSAGES)
        base, adapted = reference.run(
            [(ids, adapter, {"max_tokens": MAX_TOKENS, "temperature": 0.0}) for adapter in (None, "smol-lora")]
        )
    finally:
        reference.parts.close()
        torch.set_num_threads(min(2, torch.get_num_threads()))
    return {NAME: base.text, "smol-lora": adapted.text}


def test_chat_on_the_default_model_matches_offline_greedy(smol_server, smol_expected):
    assert "Paris" in smol_expected[NAME]  # the real model, answering
    assert smol_expected["smol-lora"] != smol_expected[NAME]

    async def chat(c: openai.AsyncOpenAI, model: str, stream: bool) -> str:
        if not stream:
            r = await c.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
            return r.choices[0].message.content
        text = ""
        async for chunk in await c.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                           temperature=0, stream=True):
            text += "".join(choice.delta.content or "" for choice in chunk.choices)
        return text

    async def scenario():
        async with openai.AsyncOpenAI(base_url=f"{smol_server.url}/v1", api_key="unused", max_retries=0,
                                      timeout=120) as c:
            jobs = [(model, stream) for model in (NAME, "smol-lora") for stream in (False, True)]
            return jobs, await asyncio.gather(*(chat(c, m, s) for m, s in jobs))

    jobs, texts = asyncio.run(scenario())
    for (model, stream), text in zip(jobs, texts):
        assert text == smol_expected[model], (model, stream)

    with openai.OpenAI(base_url=f"{smol_server.url}/v1", api_key="unused", max_retries=0) as c:
        models = {m.id: m for m in c.models.list().data}
    assert models["smol-lora"].model_extra["parent"] == NAME
