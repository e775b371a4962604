"""What the client returns: small frozen dataclasses, parsed once from the server's JSON.

Parsing is lenient about missing optional fields so that a newer server (more fields) or
a TGI-compatible peer (fewer fields) still reads.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Token:
    """One generated token as TGI reports it."""

    id: int
    text: str
    logprob: float | None = None
    special: bool = False

    @classmethod
    def from_json(cls, data: dict) -> Token:
        return cls(int(data.get("id", -1)), data.get("text", ""), data.get("logprob"), bool(data.get("special")))


@dataclass(frozen=True)
class GenerateResult:
    """POST /generate: the text and, when the server sent details, how it ended."""

    text: str
    finish_reason: str | None  # TGI's: "length", "eos_token", "stop_sequence"
    generated_tokens: int | None
    prompt_tokens: int | None
    tokens: tuple[Token, ...] | None = None  # None when the server sent no per-token details
    request_id: str | None = None
    seed: int | None = None
    # decoder_input_details=True: every prompt token with the logprob of it given the ones
    # before (None for the first); None when the server sent none.
    prefill: tuple[Token, ...] | None = None


@dataclass(frozen=True)
class StreamEvent:
    """One /generate_stream event: a token; the last event also carries the whole result."""

    text: str  # this event's piece of text
    token: Token
    result: GenerateResult | None = None  # set on the final event only

    @property
    def is_final(self) -> bool:
        return self.result is not None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def from_json(cls, data: dict | None) -> Usage | None:
        if not data:
            return None
        prompt, completion = int(data.get("prompt_tokens", 0)), int(data.get("completion_tokens", 0))
        return cls(prompt, completion, int(data.get("total_tokens", prompt + completion)))


@dataclass(frozen=True)
class ChatResult:
    """POST /v1/chat/completions (first choice)."""

    text: str
    finish_reason: str | None  # OpenAI's: "stop", "length", "abort"
    usage: Usage | None
    model: str | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class ChatDelta:
    """One streamed chat chunk: a text delta; the last ones carry finish_reason and usage."""

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass(frozen=True)
class ModelInfo:
    """GET /v1/models entry: the base model (parent None) or an adapter (parent = base)."""

    id: str
    parent: str | None = None
    max_model_len: int | None = None
    owned_by: str | None = None

    @classmethod
    def from_json(cls, data: dict) -> ModelInfo:
        return cls(data["id"], data.get("parent"), data.get("max_model_len"), data.get("owned_by"))


@dataclass(frozen=True)
class AdapterInfo:
    """GET /v1/adapters/{id}: where an adapter lives and what it is."""

    id: str
    version: int | None = None
    status: str | None = None
    tier: str | None = None  # "disk", "cpu" or "device"
    rank: int | None = None
    target_modules: tuple[str, ...] = ()
    bytes: int | None = None
    disk_bytes: int | None = None
    pinned: bool = False
    running_requests: int = 0
    source: str | None = None
    error: str | None = None
    error_type: str | None = None

    @classmethod
    def from_json(cls, data: dict) -> AdapterInfo:
        return cls(
            id=data["id"],
            version=data.get("version"),
            status=data.get("status"),
            tier=data.get("tier"),
            rank=data.get("rank"),
            target_modules=tuple(data.get("target_modules") or ()),
            bytes=data.get("bytes"),
            disk_bytes=data.get("disk_bytes"),
            pinned=bool(data.get("pinned")),
            running_requests=int(data.get("running_requests") or 0),
            source=data.get("source"),
            error=data.get("error"),
            error_type=data.get("error_type"),
        )
