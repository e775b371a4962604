"""Keep server paths out of what clients see: error messages name files by their last part.

A message like "cannot read /srv/loramux/adapters/x/adapter_model.safetensors" tells a
stranger how the server's disk is laid out; clients get ".../adapter_model.safetensors".
API routes named in messages ("upload one with POST /v1/adapters") are kept.
"""

from __future__ import annotations

import re

# An absolute POSIX path of two or more parts, or a Windows drive path.
_PATH = re.compile(r"(?<![\w.~/-])(?:/[^\s'\"`/:;,()\[\]{}<>]+){2,}/?|\b[A-Za-z]:\\[^\s'\"`;,()]+")
_API_ROOTS = ("/v1/", "/generate", "/info", "/health", "/metrics")


def _short(match: re.Match) -> str:
    path = match.group(0)
    if path.startswith(_API_ROOTS):
        return path
    last = re.split(r"[/\\]", path.rstrip("/\\"))[-1]
    return f".../{last}" if last else "..."


def redact_paths(message: str) -> str:
    return _PATH.sub(_short, message)
