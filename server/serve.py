"""`loramux serve`: parse the command line into a LoramuxConfig and run the HTTP server."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import re
import sys
from pathlib import Path

from loramux.server.model_fetch import default_model_dir, fetch_default_model, is_complete, loramux_home

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'512M', '4G', '4GiB', '1048576' -> bytes (powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 4G)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


API_KEY_ENV = "LORAMUX_API_KEY"
ADMIN_API_KEY_ENV = "LORAMUX_ADMIN_API_KEY"


def _keys(values: list[str] | None, files: list[str] | None, env: str | None = None) -> tuple[str, ...]:
    """Keys from flags, key files and the environment variable `env` (comma-separated), so
    that keys can stay off the command line (which `ps` shows to every user)."""
    keys = list(values or [])
    if env:
        keys += [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]
    for file in files or []:
        keys += [line.strip() for line in Path(file).read_text().splitlines() if line.strip()]
    return tuple(dict.fromkeys(keys))


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="HF-format checkpoint directory (default: the fetched SmolLM2-135M-Instruct)")
    g.add_argument("--served-model-name", help="the base model's id in the API (default: the directory name)")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto (default): bf16 on CUDA and on CPUs that run bf16 faster than fp32, else float32",
    )
    g.add_argument("--device", default="cpu")
    g.add_argument("--max-model-len", type=int)
    g.add_argument("--lora-backend", default="auto", choices=["auto", "cpu", "torch", "triton"])
    g.add_argument("--threads", type=int, help="torch threads for the engine")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("adapters")
    g.add_argument("--adapter-dir", action="append", default=[], help="each subfolder is one adapter (repeatable)")
    g.add_argument("--upload-dir", help="where uploaded adapters are kept (default: $LORAMUX_HOME/adapters)")
    g.add_argument("--pin", action="append", default=[], help="keep this adapter on the device (repeatable)")
    g.add_argument("--max-loras", type=int, default=8, help="device adapter slots")
    g.add_argument("--max-lora-rank", type=int, default=64)
    g.add_argument("--cpu-cache-bytes", type=parse_bytes, default=parse_bytes("4G"))
    g.add_argument("--cpu-prefault-bytes", type=parse_bytes, default=parse_bytes("512M"),
                   help="CPU-tier memory faulted in ahead of adapter loads (0: on first use)")
    g.add_argument("--max-upload-bytes", type=parse_bytes, default=parse_bytes("1G"))
    g.add_argument("--max-concurrent-uploads", type=int, default=2, help="more get 429")
    g.add_argument("--max-merged-adapters", type=int, default=64, help="merged adapters (merged_adapters) kept at once")
    g.add_argument("--max-merge-ids", type=int, default=8, help="adapters one merged_adapters may name")
    g = p.add_argument_group("scheduling")
    g.add_argument("--kv-cache-bytes", type=parse_bytes, default=parse_bytes("2G"))
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--prefix-caching", dest="enable_prefix_caching", action=argparse.BooleanOptionalAction,
                   default=True, help="reuse cached KV blocks of shared prompt prefixes, per adapter version")
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--long-prefill-token-threshold", type=int, default=512)
    g.add_argument("--starvation-bound", type=float, default=10.0, help="seconds")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", action="append",
                   help=f"require this bearer key (repeatable; also ${API_KEY_ENV}, comma-separated)")
    g.add_argument("--api-key-file", action="append", help="one key per line")
    g.add_argument("--admin-api-key", action="append",
                   help=f"key for adapter management (repeatable; also ${ADMIN_API_KEY_ENV}); without one, "
                        "management is refused unless the server is bound to a loopback address with no keys")
    g.add_argument("--admin-api-key-file", action="append")
    g.add_argument("--metrics-require-api-key", action="store_true", help="put /metrics behind the API key")
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="accept `chat_template` and non-scalar `chat_template_kwargs` from clients")
    g.add_argument("--max-prompt-tokens", type=int)
    g.add_argument("--max-prompt-chars", type=int, help="refuse longer prompts before tokenizing them")
    g.add_argument("--max-new-tokens", type=int, help="cap on a request's max tokens")
    g.add_argument("--default-max-new-tokens", type=int, default=256)
    g.add_argument("--max-concurrent-requests", type=int, default=1024,
                   help="sequences in flight (each choice counts); beyond it, 429")
    g.add_argument("--max-request-body-bytes", type=parse_bytes, default=parse_bytes("4M"),
                   help="limit on request bodies other than uploads (413), checked as they stream in")
    g.add_argument("--max-choices-per-request", type=int, default=16, help="cap on prompts x n")
    g.add_argument("--max-stop-sequences", type=int, default=16)
    g.add_argument("--max-stop-sequence-chars", type=int, default=256)
    g.add_argument("--default-repetition-window", type=int, default=0,
                   help="end requests whose last N tokens repeat one short loop (finish_reason length, "
                        "stop_reason repetition) unless they set repetition_window; 0 (default) = off")
    g.add_argument("--default-repetition-max-period", type=int, default=8,
                   help="longest loop (tokens) the default repetition guard looks for")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds running requests get to finish after SIGTERM")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def config_from_args(args: argparse.Namespace):
    """-> LoramuxConfig (imports the heavy modules only when serving)."""
    from loramux.adapter_store.config import AdapterStoreConfig
    from loramux.server.config import (
        CacheConfig,
        LoramuxConfig,
        LoraSlotsConfig,
        ModelConfig,
        SchedulingConfig,
        ServerConfig,
    )

    if args.model:
        model_dir = Path(args.model)
    else:
        model_dir = default_model_dir()
        if not is_complete(model_dir):
            fetch_default_model(model_dir)
    upload_dir = Path(args.upload_dir) if args.upload_dir else loramux_home() / "adapters"
    return LoramuxConfig(
        model=ModelConfig(
            model_dir=model_dir,
            served_model_name=args.served_model_name or model_dir.name,
            dtype=args.dtype,
            device=args.device,
            max_model_len=args.max_model_len,
            lora_backend=args.lora_backend,
            num_threads=args.threads,
            seed=args.seed,
        ),
        lora=LoraSlotsConfig(max_loras=args.max_loras, max_lora_rank=args.max_lora_rank),
        cache=CacheConfig(
            kv_cache_bytes=args.kv_cache_bytes,
            block_size=args.block_size,
            enable_prefix_caching=args.enable_prefix_caching,
        ),
        scheduling=SchedulingConfig(
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
            long_prefill_token_threshold=args.long_prefill_token_threshold,
            starvation_bound_s=args.starvation_bound,
        ),
        adapters=AdapterStoreConfig(
            adapter_dirs=tuple(Path(d) for d in args.adapter_dir),
            upload_root=upload_dir,
            cpu_cache_bytes=args.cpu_cache_bytes,
            cpu_prefault_bytes=args.cpu_prefault_bytes,
            max_upload_bytes=args.max_upload_bytes,
            max_concurrent_uploads=args.max_concurrent_uploads,
            pinned=tuple(args.pin),
            max_merged_adapters=args.max_merged_adapters,
            max_merge_ids=args.max_merge_ids,
        ),
        server=ServerConfig(
            host=args.host,
            port=args.port,
            api_keys=_keys(args.api_key, args.api_key_file, API_KEY_ENV),
            admin_api_keys=_keys(args.admin_api_key, args.admin_api_key_file, ADMIN_API_KEY_ENV),
            metrics_require_api_key=args.metrics_require_api_key,
            trust_request_chat_template=args.trust_request_chat_template,
            max_prompt_tokens=args.max_prompt_tokens,
            max_prompt_chars=args.max_prompt_chars,
            max_new_tokens=args.max_new_tokens,
            default_max_new_tokens=args.default_max_new_tokens,
            max_concurrent_requests=args.max_concurrent_requests,
            max_request_body_bytes=args.max_request_body_bytes,
            max_choices_per_request=args.max_choices_per_request,
            max_stop_sequences=args.max_stop_sequences,
            max_stop_sequence_chars=args.max_stop_sequence_chars,
            default_repetition_window=args.default_repetition_window,
            default_repetition_max_period=args.default_repetition_max_period,
            drain_timeout_s=args.drain_timeout,
            log_level=args.log_level,
        ),
    )


def configure_logging(level: str) -> None:
    from loramux.server.api.context import RequestIdLogFilter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    handler.addFilter(RequestIdLogFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def serve(args: argparse.Namespace) -> int:
    import torch

    from loramux.kernels.openmp import set_thread_openmp_threads
    from loramux.server.api.app import create_app
    from loramux.server.builder import build_engine
    from loramux.server.metrics import ServerMetrics
    from loramux.server.native_memory import bound_onednn_cache

    bound_onednn_cache()  # before the first GEMM (the dtype probe's)
    configure_logging(args.log_level)
    config = config_from_args(args)
    if config.model.num_threads:
        torch.set_num_threads(config.model.num_threads)  # the count the engine thread takes up
    # The engine runs in its own thread; this one (model loading, then HTTP) must not keep
    # an OpenMP worker pool of its own (loramux_kernels/openmp.py).
    set_thread_openmp_threads(1)
    metrics = ServerMetrics(config.lora.max_loras)
    try:
        parts = build_engine(config, on_adapter_load=metrics.observe_adapter_load)
    except ValueError as exc:  # ModelUnsupported, CheckpointError, ConfigError: one clear line
        print(f"loramux serve: error: {exc}", file=sys.stderr)
        return 2
    runner = ServerRunner(config.server)
    app = create_app(parts, metrics, on_fatal=runner.fatal)
    # The ~400k objects of torch, transformers and the model out of the cyclic collector's
    # reach: a full collection over them takes ~180 ms, holding the GIL, so every stream,
    # /health and adapter load would stall whenever one ran.
    gc.freeze()
    return runner.run(app)


class ServerRunner:
    """uvicorn with the two exits an orchestrator needs.

    SIGTERM drains: /health turns 503 and new requests get 503 at once, running ones get
    `drain_timeout_s` to finish and are then ended with a final event; only then does
    uvicorn close. A second SIGTERM (or SIGINT) stops at once. A dead engine exits with a
    non-zero code (after its requests were failed), so that the server is restarted."""

    def __init__(self, server_config) -> None:
        self.config = server_config
        self.exit_code = 0
        self._server = None
        self._drain_requested = False
        self._drain_task = None

    def run(self, app) -> int:
        import asyncio
        import signal

        import uvicorn

        runner = self
        service = app.state.service

        class _Server(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:
                # A signal handler: set flags only; the drain starts on the loop (on_tick).
                if sig == signal.SIGTERM and not runner._drain_requested:
                    runner._drain_requested = True
                    service.draining = True  # at once: the next /health answers 503
                    return
                super().handle_exit(sig, frame)

            async def on_tick(self, counter: int) -> bool:
                if runner._drain_requested and runner._drain_task is None:
                    runner._drain_task = asyncio.create_task(runner._drain(service))
                return await super().on_tick(counter)

        uvicorn_config = uvicorn.Config(
            app,
            host=self.config.host,
            port=self.config.port,
            log_level=self.config.log_level,
            access_log=False,  # our middleware logs each request with its id
            log_config=None,
            timeout_graceful_shutdown=5,  # after the drain, connections still open are closed
        )
        self._server = _Server(uvicorn_config)
        self._server.run()
        return self.exit_code

    async def _drain(self, service) -> None:
        logger = logging.getLogger("loramux.serve")
        logger.warning("SIGTERM: draining (up to %.1f s), then exiting", self.config.drain_timeout_s)
        try:
            await service.drain(self.config.drain_timeout_s)
        finally:
            self._server.should_exit = True

    def fatal(self, code: int) -> None:
        """The engine died: exit with `code` through uvicorn's shutdown, or hard after 10 s."""
        import threading

        self.exit_code = code
        if self._server is not None:
            self._server.should_exit = True
        timer = threading.Timer(10.0, os._exit, (code,))
        timer.daemon = True
        timer.start()
