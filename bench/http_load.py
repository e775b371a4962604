"""Closed-loop streaming clients over an OpenAI-style /v1/chat/completions, and server start-up.

Each client sends its next request when the last one ends (adapter = client index modulo
the adapters), for a fixed time; a request counts when its stream ends with a usage of
exactly the asked number of new tokens. Used by bench-serve and bench-peers.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.common import TOPICS

# (adapter, user text, new tokens) -> the JSON body of one request.
BodyFactory = Callable[[str, str, int], dict]


@dataclass
class ClientStats:
    tokens: int = 0
    errors: int = 0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    completed: list[tuple[str, str]] = field(default_factory=list)  # (adapter, question) per request
    error_samples: list[str] = field(default_factory=list)  # why, for the first few errors

    def error(self, why: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(why[:300])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def question(client: int, turn: int) -> str:
    topic = TOPICS[(client * 7 + turn) % len(TOPICS)]
    return f"Tell me about {topic}: the main ideas, one example and one surprising fact."


def chat_body(adapter: str, text: str, new_tokens: int) -> dict:
    """A greedy streaming chat request of exactly `new_tokens` tokens (EOS ignored); model = adapter."""
    return {"model": adapter, "messages": [{"role": "user", "content": text}], "max_tokens": new_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


async def client_loop(http: httpx.AsyncClient, index: int, adapters: list[str], deadline: float,
                      stats: ClientStats, new_tokens: int, body_for: BodyFactory = chat_body) -> None:
    turn = 0
    while time.monotonic() < deadline:
        adapter, text = adapters[index % len(adapters)], question(index, turn)
        turn += 1
        body = body_for(adapter, text, new_tokens)
        sent = time.monotonic()
        last, usage = None, None
        try:
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    stats.error(f"{response.status_code}: {(await response.aread()).decode(errors='replace')}")
                    continue
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        stats.error(f"error event: {json.dumps(chunk['error'])}")
                        break
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    if not chunk["choices"] or not chunk["choices"][0]["delta"].get("content"):
                        continue
                    now = time.monotonic()
                    if last is None:
                        stats.ttft_s.append(now - sent)
                    else:
                        stats.itl_s.append(now - last)
                    last = now
        except httpx.HTTPError as exc:
            stats.error(f"{type(exc).__name__}: {exc}")
            continue
        if usage is None or usage["completion_tokens"] != new_tokens:  # no usage, or short
            stats.error(f"usage {json.dumps(usage)}, {new_tokens} new tokens asked")
            continue
        stats.tokens += usage["completion_tokens"]
        stats.completed.append((adapter, text))


async def drive(base_url: str, adapters: list[str], seconds: float, num_clients: int, new_tokens: int,
                body_for: BodyFactory = chat_body) -> tuple[ClientStats, float]:
    """`num_clients` closed-loop clients for `seconds`; their stats and the elapsed time."""
    stats = ClientStats()
    limits = httpx.Limits(max_connections=num_clients + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as http:
        started = time.monotonic()
        deadline = started + seconds
        await asyncio.gather(*(client_loop(http, i, adapters, deadline, stats, new_tokens, body_for)
                               for i in range(num_clients)))
        elapsed = time.monotonic() - started
    return stats, elapsed


def wait_healthy(process: subprocess.Popen, url: str, log: Path, timeout_s: float = 180.0) -> subprocess.Popen:
    """Poll `url` until it answers 200; kill the process and raise if it exits or takes too long."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited early (code {process.returncode}); see {log}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    process.wait(30)
    raise RuntimeError(f"the server did not become healthy in {timeout_s:.0f} s; see {log}")
