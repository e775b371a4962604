"""Perplexity of a text under the base model or an adapter: the arithmetic shared by
`make eval` (bench/eval_bf16.py, offline, fp32 against bf16) and `loramux eval`, which asks
a running server through its API (TGI's /generate with `decoder_input_details`: the
logprob of every prompt token given the ones before it).

No torch here: `loramux eval` is a client command.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_CHUNK_CHARS = 1500  # ~400 tokens of English: well inside any max prompt length
MAX_TEXT_BYTES = 16 << 20  # a text file larger than this is refused, not read


class EvalError(ValueError):
    """The text or the server's answer cannot be evaluated (empty, no logprobs)."""


def perplexity(logprobs: Sequence[float]) -> float:
    """exp(-mean logprob) of the scored tokens."""
    if not logprobs:
        raise EvalError("no scored tokens: the text is too short")
    return math.exp(-math.fsum(logprobs) / len(logprobs))


def ppl_increase_pct(reference: float, other: float) -> float:
    """How much higher `other`'s perplexity is than `reference`'s, in percent."""
    return (other / reference - 1.0) * 100.0


def top1_agreement(reference: Sequence[int], other: Sequence[int]) -> float:
    """The fraction of positions whose most likely token is the same in both runs."""
    if len(reference) != len(other) or not reference:
        raise EvalError(f"cannot compare {len(reference)} positions with {len(other)}")
    return sum(a == b for a, b in zip(reference, other)) / len(reference)


def text_chunks(text: str, max_chars: int = DEFAULT_CHUNK_CHARS) -> list[str]:
    """Paragraphs packed into chunks of at most `max_chars` characters; a longer paragraph
    is cut at spaces (a word longer than the bound is cut where it must)."""
    if max_chars < 1:
        raise EvalError("max_chars must be >= 1")
    pieces: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split())
        while len(paragraph) > max_chars:
            cut = paragraph.rfind(" ", 0, max_chars + 1)
            cut = cut if cut > 0 else max_chars
            pieces.append(paragraph[:cut])
            paragraph = paragraph[cut:].lstrip()
        if paragraph:
            pieces.append(paragraph)
    chunks: list[str] = []
    for piece in pieces:
        if chunks and len(chunks[-1]) + 2 + len(piece) <= max_chars:
            chunks[-1] += "\n\n" + piece
        else:
            chunks.append(piece)
    return chunks


@dataclass(frozen=True)
class ApiEvalResult:
    adapter: str  # the adapter id, or "base"
    num_chunks: int
    num_tokens: int  # scored tokens (every prompt token but each chunk's first)
    perplexity: float


def evaluate_over_api(client, text: str, adapter_id: str | None, max_chars: int = DEFAULT_CHUNK_CHARS) -> ApiEvalResult:
    """Perplexity of `text` under `adapter_id` (None: base) on the server `client` talks to
    (a loramux.clients.Client): one /generate per chunk, 1 new token, prefill logprobs."""
    chunks = text_chunks(text, max_chars)
    if not chunks:
        raise EvalError("the text is empty")
    logprobs: list[float] = []
    for chunk in chunks:
        result = client.generate(chunk, adapter_id, max_new_tokens=1, decoder_input_details=True)
        if result.prefill is None:
            raise EvalError("the server returned no prompt logprobs (decoder_input_details)")
        logprobs += [t.logprob for t in result.prefill if t.logprob is not None]
    return ApiEvalResult(adapter_id or "base", len(chunks), len(logprobs), perplexity(logprobs))


# --------------------------------------------------------------------------- `loramux eval`


def add_eval_command(commands) -> None:
    """Registers `loramux eval FILE [--adapter ID ...]` on the `loramux` parser (server/cli.py);
    the connection options and error handling are the client commands' (clients/cli.py)."""
    from loramux.clients.cli import _command, _connection_options

    def handler(args: argparse.Namespace) -> int:
        try:
            return _command(_run_eval)(args)
        except (EvalError, OSError, UnicodeDecodeError) as exc:  # the file, or an answer without logprobs
            print(f"loramux: error: {exc}", file=sys.stderr)
            return 1

    p = commands.add_parser(
        "eval",
        parents=[_connection_options()],
        help="perplexity of a text file under the base model or adapters, through a running server",
    )
    p.add_argument("file", type=Path, help="UTF-8 text file ('-': stdin)")
    p.add_argument("--adapter", action="append", help="adapter id (repeatable; default: the base model)")
    p.add_argument("--base", action="store_true", help="also the base model when adapters are named")
    p.add_argument("--chunk-chars", type=int, default=DEFAULT_CHUNK_CHARS, help="characters per request")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    p.set_defaults(handler=handler)


def read_text(path: Path) -> str:
    if str(path) == "-":
        return sys.stdin.read(MAX_TEXT_BYTES + 1)[:MAX_TEXT_BYTES]
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise EvalError(f"{path} is larger than {MAX_TEXT_BYTES} bytes")
    return path.read_text(encoding="utf-8")


def _run_eval(client, args: argparse.Namespace) -> None:
    text = read_text(args.file)
    targets: list[str | None] = list(args.adapter or [])
    if not targets or args.base:
        targets.insert(0, None)
    for adapter in targets:
        result = evaluate_over_api(client, text, adapter, args.chunk_chars)
        if args.json:
            print(json.dumps(asdict(result)), flush=True)
        else:
            print(
                f"eval: adapter={result.adapter} tokens={result.num_tokens} perplexity={result.perplexity:.4f}",
                flush=True,
            )
