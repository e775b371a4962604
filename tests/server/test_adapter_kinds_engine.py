"""DoRA and embed_tokens / lm_head adapters through the whole engine: the adapter store's
loader thread reads them and writes them into device slots (one slot: they evict each
other, so a slot is rewritten between kinds), the scheduler batches them, and greedy
tokens and prompt logprobs equal peft's."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from loramux.adapter_store.config import AdapterStoreConfig
from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.builder import build_engine
from loramux.server.config import CacheConfig, LoramuxConfig, LoraSlotsConfig, ModelConfig
from loramux.server.offline import OfflineEngine, OfflineRequest
from tests.engine_fixtures import smol_tokenizer  # noqa: F401 (fixture)
from tests.peft_adapters import AdapterRecipe, make_peft_adapter
from tests.tiny_models import save_tiny_model

RECIPES = [
    AdapterRecipe("dora", r=4, lora_alpha=8, use_dora=True, magnitude_jitter=0.2, seed=1, b_std=0.2),
    AdapterRecipe("vocab", r=4, target_modules=["embed_tokens", "lm_head"], seed=2, b_std=0.3),
    AdapterRecipe("dora-head", r=2, target_modules=["lm_head", "o_proj"], use_dora=True, seed=3, b_std=0.3),
]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def files(tmp_path_factory, smol_tokenizer):  # noqa: F811
    root = tmp_path_factory.mktemp("adapter-kinds")
    model_dir, adapter_dir = root / "model", root / "adapters"
    hf = save_tiny_model(model_dir, "llama-tied", vocab_size=len(smol_tokenizer), max_position_embeddings=256)
    smol_tokenizer.save_pretrained(model_dir)
    adapter_dir.mkdir()
    for recipe in RECIPES:
        make_peft_adapter(hf, recipe, adapter_dir)
    return hf, model_dir, adapter_dir


def test_engine_serves_dora_and_vocab_adapters_as_peft(files, smol_tokenizer):  # noqa: F811
    hf, model_dir, adapter_dir = files
    config = LoramuxConfig(
        model=ModelConfig(model_dir=model_dir, served_model_name="tiny", max_model_len=256, dtype="float32"),
        lora=LoraSlotsConfig(max_loras=1, max_lora_rank=8),
        cache=CacheConfig(kv_cache_bytes=16 << 20, enable_prefix_caching=False),
        adapters=AdapterStoreConfig(adapter_dirs=(adapter_dir,)),
    )
    prompt = smol_tokenizer("Once upon a time", add_special_tokens=False).input_ids
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    parts = build_engine(config)
    try:
        engine = OfflineEngine(parts.core)
        # Twice over: the one slot is rewritten from each kind to the next and back.
        names = [r.name for r in RECIPES] * 2 + [None]
        results = engine.generate([OfflineRequest(prompt, params, name) for name in names])
    finally:
        parts.close()

    peft = PeftModel.from_pretrained(hf, adapter_dir / RECIPES[0].name, adapter_name=RECIPES[0].name)
    for recipe in RECIPES[1:]:
        peft.load_adapter(adapter_dir / recipe.name, adapter_name=recipe.name)
    peft.eval()
    base = results[-1].token_ids
    for name, result in zip(names, results):
        assert result.error is None, result.error
        tokens = torch.tensor([prompt + result.token_ids])
        with torch.no_grad():
            if name is None:
                with peft.disable_adapter():
                    logits = peft(tokens).logits[0]
            else:
                peft.set_adapter(name)
                logits = peft(tokens).logits[0]
        assert result.token_ids == logits[len(prompt) - 1 : -1].argmax(-1).tolist(), name
        logprobs = torch.log_softmax(logits[: len(prompt) - 1], dim=-1)
        expected = [float(logprobs[i, t]) for i, t in enumerate(prompt[1:])]
        assert [p.logprob for p in result.prompt_logprobs] == pytest.approx(expected, abs=1e-4), name
        if name is not None:
            assert result.token_ids != base, f"{name} does not change what the model says"
