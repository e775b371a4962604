"""Shared pieces of the benchmarks: prompts, peft adapters, engine set-up, timing, results."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

from loramux.server.dtype_choice import cpu_flags
from loramux.server.model_fetch import default_model_dir

RESULTS_DIR = Path(__file__).parent / "results"

TOPICS = [
    "the water cycle", "photosynthesis", "the French revolution", "black holes", "how vaccines work",
    "the stock market", "plate tectonics", "machine learning", "the Roman empire", "climate change",
    "the human heart", "electric cars", "the printing press", "honey bees", "volcanoes", "the internet",
]


def chat_prompts(tokenizer, count: int = 16, target_tokens: int = 70) -> list[list[int]]:
    """`count` chat prompts of about `target_tokens` tokens each (chat template applied)."""
    prompts = []
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)]
        words = (
            f"Please explain {topic} to a curious student. Cover the main ideas, give two concrete "
            f"examples, mention one common misconception about {topic}, and finish with a short summary"
        )
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": words}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False).input_ids
        prompts.append(ids[: max(target_tokens, 1)] if len(ids) > target_tokens + 10 else ids)
    return prompts


def median_min_max(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def machine() -> dict:
    """What every result records beside its figures: the CPU (its feature flags decide bf16
    vs fp32 speed), torch and the threads."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_flags": sorted(cpu_flags()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def write_result(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({**payload, "machine": machine(), "model": str(default_model_dir().name)}, indent=1))
    return path


def make_bench_adapters(model_dir: Path, out: Path, prefix: str, ranks, seed: int,
                        target_modules: list[str] | str = "all-linear") -> list[str]:
    """Random PEFT adapters (alpha = 2r, all-linear unless told) for the model in `model_dir`, written to `out`."""
    from transformers import AutoModelForCausalLM

    from tests.peft_adapters import AdapterRecipe, make_peft_adapter

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    names = []
    for i, rank in enumerate(ranks):
        recipe = AdapterRecipe(f"{prefix}-{i}-r{rank}", r=rank, target_modules=target_modules, lora_alpha=2 * rank,
                               seed=seed + i, b_std=0.01)
        make_peft_adapter(hf, recipe, out)
        names.append(recipe.name)
    return names


def bench_engine_parts(model_dir: Path, adapter_dir: Path, max_loras: int, max_lora_rank: int,
                       max_num_seqs: int = 64, kv_cache_bytes: int = 1 << 30, dtype: str = "float32"):
    """A full engine (fp32 unless told, 2 threads, max_model_len 1024) serving the adapters in `adapter_dir`."""
    from loramux.adapter_store.config import AdapterStoreConfig
    from loramux.server.builder import build_engine
    from loramux.server.config import CacheConfig, LoramuxConfig, LoraSlotsConfig, ModelConfig, SchedulingConfig

    return build_engine(LoramuxConfig(
        model=ModelConfig(model_dir=model_dir, served_model_name="base", max_model_len=1024, num_threads=2,
                          dtype=dtype),
        lora=LoraSlotsConfig(max_loras=max_loras, max_lora_rank=max_lora_rank),
        cache=CacheConfig(kv_cache_bytes=kv_cache_bytes),
        scheduling=SchedulingConfig(max_num_seqs=max_num_seqs),
        adapters=AdapterStoreConfig(adapter_dirs=(adapter_dir,)),
    ))
