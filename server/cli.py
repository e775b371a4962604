"""The `loramux` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _fetch_model(args: argparse.Namespace) -> int:
    from loramux.server.model_fetch import fetch_default_model

    fetch_default_model(Path(args.target) if args.target else None, force=args.force)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from loramux.server.serve import serve

    return serve(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loramux", description="Multi-adapter LoRA inference server")
    commands = parser.add_subparsers(dest="command", required=True)

    fetch = commands.add_parser("fetch-model", help="put the default model (SmolLM2-135M-Instruct) on disk")
    fetch.add_argument("--target", help="directory (default: $LORAMUX_HOME/models/smollm2-135m-instruct)")
    fetch.add_argument("--force", action="store_true", help="fetch again even if present")
    fetch.set_defaults(handler=_fetch_model)

    from loramux.server.serve import add_serve_arguments

    serve = commands.add_parser("serve", help="start the HTTP server (default: the default model on 127.0.0.1:8000)")
    add_serve_arguments(serve)
    serve.set_defaults(handler=_serve)

    from loramux.clients.cli import add_client_commands  # httpx only: these commands never load torch

    add_client_commands(commands)

    from loramux.server.eval import add_eval_command  # a client command too: no torch

    add_eval_command(commands)

    from loramux.server.export_command import add_export_command

    add_export_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
