"""`make eval`: bf16 accuracy against fp32, measured on held-out text.

    python -m bench.eval_bf16 [--text bench/eval_data/heldout.txt] [--window 256] [--threads 2]

For the base model and each demo adapter (examples/adapters/*), the engine scores every
token of the held-out text (teacher forcing: prompt logprobs of windows of `--window`
tokens, each window's first token unscored) once in fp32 and once in bf16, all windows of
all adapters in one batch (the LoRA kernels see mixed adapters, as in serving). Reported
per model: perplexity in both dtypes, the bf16 increase in percent, and the top-1
agreement (the fraction of positions whose most likely token is the same in bf16 and fp32).

Targets: bf16 perplexity within 1% of fp32, agreement >= 0.98, for every adapter. The
result goes to bench/results/eval.json with the CPU flags; the last line is
`eval: max_ppl_increase_pct=X min_top1_agreement=Y` (worst over base and adapters).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench.common import write_result
from loramux.adapter_store.config import AdapterStoreConfig
from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.builder import build_engine
from loramux.server.config import CacheConfig, LoramuxConfig, LoraSlotsConfig, ModelConfig, SchedulingConfig
from loramux.server.dtype_choice import cpu_flags
from loramux.server.eval import perplexity, ppl_increase_pct, top1_agreement
from loramux.server.model_fetch import default_model_dir
from loramux.server.offline import OfflineEngine, OfflineRequest

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = REPO / "bench" / "eval_data" / "heldout.txt"
DEFAULT_ADAPTERS = REPO / "examples" / "adapters"
MAX_PPL_INCREASE_PCT = 1.0
MIN_TOP1_AGREEMENT = 0.98
BASE = "base"


def demo_adapters(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "adapter_config.json").is_file())


def windows(token_ids: list[int], size: int) -> list[list[int]]:
    """Consecutive windows of `size` tokens; a last one shorter than 2 tokens scores nothing."""
    return [w for w in (token_ids[i : i + size] for i in range(0, len(token_ids), size)) if len(w) >= 2]


def score(model_dir: Path, adapter_root: Path, dtype: str, text: str, window: int, threads: int, adapters) -> dict:
    """{model: (logprobs of the actual tokens, top-1 token ids)} for base and each adapter."""
    config = LoramuxConfig(
        model=ModelConfig(model_dir=model_dir, served_model_name=BASE, dtype=dtype, num_threads=threads, max_model_len=1024),
        lora=LoraSlotsConfig(max_loras=max(1, len(adapters)), max_lora_rank=64),
        cache=CacheConfig(kv_cache_bytes=256 << 20),
        scheduling=SchedulingConfig(max_num_batched_tokens=2048),
        adapters=AdapterStoreConfig(adapter_dirs=(adapter_root,)),
    )
    parts = build_engine(config)
    try:
        ids = parts.tokenizer(text, add_special_tokens=False).input_ids
        chunks = windows(ids, window)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        models = [BASE, *adapters]
        requests = [OfflineRequest(c, params, None if m == BASE else m) for m in models for c in chunks]
        results = OfflineEngine(parts.core).generate(requests)
    finally:
        parts.close()
    scored: dict[str, tuple[list[float], list[int]]] = {m: ([], []) for m in models}
    for request, result in zip(requests, results):
        expected = len(request.prompt_token_ids) - 1
        if len(result.prompt_logprobs) != expected:
            raise RuntimeError(f"{len(result.prompt_logprobs)} prompt logprobs for {expected} positions")
        logprobs, top1 = scored[request.adapter_id or BASE]
        for lp in result.prompt_logprobs:
            logprobs.append(lp.logprob)
            top1.append(lp.top[0][0] if lp.top else lp.token_id)
    return scored


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--adapters", type=Path, default=DEFAULT_ADAPTERS, help="each subfolder is one adapter")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--window", type=int, default=256, help="tokens per teacher-forced window")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-result", action="store_true", help="do not write bench/results/eval.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = args.model_dir or default_model_dir()
    text = args.text.read_text(encoding="utf-8")
    adapters = demo_adapters(args.adapters)
    started = time.perf_counter()
    fp32 = score(model_dir, args.adapters, "float32", text, args.window, args.threads, adapters)
    bf16 = score(model_dir, args.adapters, "bfloat16", text, args.window, args.threads, adapters)
    rows = {}
    for model in [BASE, *adapters]:
        (lp32, top32), (lp16, top16) = fp32[model], bf16[model]
        ppl32, ppl16 = perplexity(lp32), perplexity(lp16)
        rows[model] = {
            "tokens": len(lp32),
            "ppl_fp32": ppl32,
            "ppl_bf16": ppl16,
            "ppl_increase_pct": ppl_increase_pct(ppl32, ppl16),
            "top1_agreement": top1_agreement(top32, top16),
        }
        r = rows[model]
        print(
            f"{model:>8}: tokens={r['tokens']} ppl fp32={ppl32:.4f} bf16={ppl16:.4f} "
            f"({r['ppl_increase_pct']:+.3f}%) top1_agreement={r['top1_agreement']:.4f}",
            flush=True,
        )
    worst_ppl = max(r["ppl_increase_pct"] for r in rows.values())
    worst_agreement = min(r["top1_agreement"] for r in rows.values())
    met = worst_ppl <= MAX_PPL_INCREASE_PCT and worst_agreement >= MIN_TOP1_AGREEMENT
    flags = sorted(cpu_flags())
    if not args.no_result:
        path = write_result(
            "eval",
            {
                "text": str(args.text.relative_to(REPO) if args.text.is_relative_to(REPO) else args.text),
                "window_tokens": args.window,
                "models": rows,
                "max_ppl_increase_pct": worst_ppl,
                "min_top1_agreement": worst_agreement,
                "targets": {"max_ppl_increase_pct": MAX_PPL_INCREASE_PCT, "min_top1_agreement": MIN_TOP1_AGREEMENT},
                "targets_met": met,
                "seconds": time.perf_counter() - started,
                "cpu_flags_of_interest": [f for f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f") if f in flags],
                "lscpu_flags": flags,
            },
        )
        print(f"wrote {path}", file=sys.stderr)
    print(f"eval: max_ppl_increase_pct={worst_ppl:.3f} min_top1_agreement={worst_agreement:.4f}")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
