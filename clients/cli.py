"""`loramux generate | chat | adapters ...`: the command-line client.

`add_client_commands` registers the commands on the `loramux` parser (server/cli.py).
Every handler returns an exit status; a failure prints one line to stderr. The server's
address and key come from --url / --api-key, else $LORAMUX_URL / $LORAMUX_API_KEY, read
when the command runs (not at import), so one parser serves any environment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict

from loramux.clients.client import DEFAULT_URL, Client
from loramux.clients.errors import LoramuxError
from loramux.clients.types import AdapterInfo

Handler = Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------- plumbing


def _connection_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("connection")
    g.add_argument("--url", help=f"server address (default: $LORAMUX_URL, else {DEFAULT_URL})")
    g.add_argument("--api-key", help="bearer key (default: $LORAMUX_API_KEY)")
    g.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for an answer (default: 300)")
    return common


def _client(args: argparse.Namespace) -> Client:
    url = args.url or os.environ.get("LORAMUX_URL") or DEFAULT_URL
    api_key = args.api_key or os.environ.get("LORAMUX_API_KEY") or None
    return Client(url, api_key=api_key, timeout=args.timeout)


def _command(body: Callable[[Client, argparse.Namespace], None]) -> Handler:
    """A handler that runs `body` with a client and turns client errors into one stderr line."""

    def handler(args: argparse.Namespace) -> int:
        try:
            with _client(args) as client:
                body(client, args)
        except LoramuxError as exc:
            sys.stdout.flush()  # a stream may have printed part of its answer
            print(f"loramux: error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
        return 0

    return handler


def _prompt(text: str) -> str:
    """'-' reads the prompt from stdin (the trailing newline of `echo` is not part of it)."""
    return sys.stdin.read().removesuffix("\n") if text == "-" else text


# --------------------------------------------------------------------------- generate / chat


def _add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt, or '-' to read it from stdin")
    p.add_argument("--adapter", help="adapter id (default: the base model)")
    p.add_argument("--max-tokens", type=int, help="most tokens to generate")
    p.add_argument("--temperature", type=float, help="0 = greedy")
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    p.add_argument("--details", action="store_true", help="print finish reason and token counts to stderr")


def _details(**fields: object) -> None:
    print(" ".join(f"{k}={v}" for k, v in fields.items() if v is not None), file=sys.stderr)


def _generate(client: Client, args: argparse.Namespace) -> None:
    params = {"max_new_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "seed": args.seed, "stop": args.stop}
    prompt = _prompt(args.prompt)
    if not args.stream:
        result = client.generate(prompt, args.adapter, **params)
        print(result.text)
    else:
        result = None
        for event in client.generate_stream(prompt, args.adapter, **params):
            print(event.text, end="", flush=True)
            result = event.result or result
        print()
    if args.details and result is not None:
        _details(finish_reason=result.finish_reason, prompt_tokens=result.prompt_tokens,
                 generated_tokens=result.generated_tokens, request_id=result.request_id)


def _chat(client: Client, args: argparse.Namespace) -> None:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": _prompt(args.prompt)})
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "seed": args.seed, "stop": args.stop}
    if not args.stream:
        result = client.chat(messages, args.adapter, **params)
        print(result.text)
        finish_reason, usage = result.finish_reason, result.usage
    else:
        finish_reason = usage = None
        for delta in client.chat(messages, args.adapter, stream=True, **params):
            print(delta.text, end="", flush=True)
            finish_reason, usage = delta.finish_reason or finish_reason, delta.usage or usage
        print()
    if args.details:
        _details(finish_reason=finish_reason, prompt_tokens=usage and usage.prompt_tokens,
                 completion_tokens=usage and usage.completion_tokens)


# --------------------------------------------------------------------------- adapters


def _size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "-"
    if num_bytes < 1024:
        return f"{num_bytes} B"
    units, size, i = ("KiB", "MiB", "GiB", "TiB"), num_bytes / 1024, 0
    while size >= 1024 and i + 1 < len(units):
        size, i = size / 1024, i + 1
    return f"{size:.1f} {units[i]}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [headers, *rows]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def adapter_table(adapters: Sequence[AdapterInfo]) -> str:
    """The `adapters list` table (the status column says why a failed adapter failed)."""
    if not adapters:
        return "no adapters"
    headers = ("ID", "VERSION", "STATUS", "TIER", "RANK", "SIZE", "PINNED", "RUNNING", "TARGETS")
    rows = [
        (
            a.id,
            "-" if a.version is None else str(a.version),
            (a.status or "-") + (f" ({a.error_type})" if a.error_type else ""),
            a.tier or "-",
            "-" if a.rank is None else str(a.rank),
            _size(a.bytes),
            "yes" if a.pinned else "no",
            str(a.running_requests),
            ",".join(a.target_modules) or "-",
        )
        for a in adapters
    ]
    return _table(headers, rows)


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, default=list))


def _adapters_list(client: Client, args: argparse.Namespace) -> None:
    adapters = client.list_adapters()
    if args.json:
        _print_json([asdict(a) for a in adapters])
    else:
        print(adapter_table(adapters))


def _adapters_show(client: Client, args: argparse.Namespace) -> None:
    info = client.get_adapter(args.adapter_id)
    if args.json:
        _print_json(asdict(info))
        return
    for key, value in asdict(info).items():
        if key == "target_modules":
            value = ", ".join(value) or "-"
        elif key in ("bytes", "disk_bytes"):
            value = _size(value)
        print(f"{key + ':':<18}{'-' if value is None else value}")


def _adapters_upload(client: Client, args: argparse.Namespace) -> None:
    info = client.upload_adapter(args.adapter_id, args.path)
    print(f"uploaded {info.id} (version {info.version}, rank {info.rank}, {info.status})")


def _adapters_rm(client: Client, args: argparse.Namespace) -> None:
    for adapter_id in args.adapter_ids:
        client.delete_adapter(adapter_id)
        print(f"deleted {adapter_id}")


def _adapters_pin(client: Client, args: argparse.Namespace) -> None:
    info = client.pin_adapter(args.adapter_id)
    print(f"pinned {info.id} (tier {info.tier})")


def _adapters_unpin(client: Client, args: argparse.Namespace) -> None:
    info = client.unpin_adapter(args.adapter_id)
    print(f"unpinned {info.id} (tier {info.tier})")


# --------------------------------------------------------------------------- registration


def add_client_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `generate`, `chat` and `adapters ...` on the `loramux` command parser."""
    common = _connection_options()

    generate = subparsers.add_parser("generate", parents=[common], help="generate text (POST /generate)")
    _add_sampling_arguments(generate)
    generate.set_defaults(handler=_command(_generate))

    chat = subparsers.add_parser("chat", parents=[common], help="one chat turn (POST /v1/chat/completions)")
    _add_sampling_arguments(chat)
    chat.add_argument("--system", help="a system message before the prompt")
    chat.set_defaults(handler=_command(_chat))

    adapters = subparsers.add_parser("adapters", help="list, upload, delete and pin adapters (admin key)")
    actions = adapters.add_subparsers(dest="adapters_command", required=True, metavar="ACTION")

    ls = actions.add_parser("list", parents=[common], help="a table of the server's adapters")
    ls.add_argument("--json", action="store_true", help="JSON instead of a table")
    ls.set_defaults(handler=_command(_adapters_list))

    show = actions.add_parser("show", parents=[common], help="one adapter's details")
    show.add_argument("adapter_id")
    show.add_argument("--json", action="store_true", help="JSON instead of lines")
    show.set_defaults(handler=_command(_adapters_show))

    upload = actions.add_parser("upload", parents=[common], help="upload a PEFT adapter")
    upload.add_argument("adapter_id")
    upload.add_argument("path", help="a directory with adapter_config.json + adapter_model.safetensors, "
                                     "or a .zip/.tar.gz holding them")
    upload.set_defaults(handler=_command(_adapters_upload))

    rm = actions.add_parser("rm", parents=[common], help="delete adapters")
    rm.add_argument("adapter_ids", nargs="+", metavar="adapter_id")
    rm.set_defaults(handler=_command(_adapters_rm))

    pin = actions.add_parser("pin", parents=[common], help="keep an adapter on the device")
    pin.add_argument("adapter_id")
    pin.set_defaults(handler=_command(_adapters_pin))

    unpin = actions.add_parser("unpin", parents=[common], help="let an adapter be evicted again")
    unpin.add_argument("adapter_id")
    unpin.set_defaults(handler=_command(_adapters_unpin))
