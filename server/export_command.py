"""The `loramux export` command line (no torch at import: `loramux --help` stays fast)."""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPE_NAMES = ("bfloat16", "float16", "float32")  # server.config.DTYPES' keys


def _run(args: argparse.Namespace) -> int:
    from loramux.adapter_store.errors import AdapterError
    from loramux.server.export import ExportError, export
    from loramux.server.model_fetch import default_model_dir, loramux_home

    upload_dir = Path(args.upload_dir) if args.upload_dir else loramux_home() / "adapters"
    try:
        out = export(args.target, Path(args.out), Path(args.model) if args.model else default_model_dir(),
                     [Path(d) for d in args.adapter_dir], upload_dir, args.dtype)
    except (ExportError, AdapterError, OSError) as exc:
        raise SystemExit(f"loramux export: {exc}") from None
    print(f"exported to {out}")
    return 0


def add_export_command(commands) -> None:
    p = commands.add_parser("export", help="write a standalone checkpoint with an adapter or a merge folded in")
    p.add_argument("target", help="an adapter id, an adapter directory, or a merge spec as JSON (or @file.json)")
    p.add_argument("--out", required=True, help="directory to write (must not exist or be empty)")
    p.add_argument("--model", help="base checkpoint directory (default: the fetched default model)")
    p.add_argument("--adapter-dir", action="append", default=[], help="where adapter ids are looked up (repeatable)")
    p.add_argument("--upload-dir", help="the server's upload directory (default: $LORAMUX_HOME/adapters)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="dtype to save (default: the base checkpoint's)")
    p.set_defaults(handler=_run)
