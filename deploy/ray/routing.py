"""Which adapter a request names, read the way the loramux server reads it.

The ingress uses this to pick a multiplexed model id; it never validates the request
(the replica's server does that) and only looks at bounded, already-read bodies.
"""

from __future__ import annotations

import json
import re

# Serve's own header: a client that sets it picks the adapter for routing directly.
MULTIPLEX_HEADER = "serve_multiplexed_model_id"
# Routes whose body names an adapter: OpenAI's `model`, LoRAX's `parameters.adapter_id`.
OPENAI_ROUTES = ("/v1/chat/completions", "/v1/completions")
LORAX_ROUTES = ("/", "/generate", "/generate_stream")
# The longest id worth routing on; anything longer is the server's to refuse.
MAX_ID_CHARS = 256
_ID_CHARS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")


def adapter_for_request(method: str, path: str, headers: dict[str, str], body: bytes,
                        base_model: str | None) -> str:
    """The adapter id to route on, or "" for the base model / routes without one.

    `headers` has lower-case names. A body that is not JSON routes as base: the replica
    answers it with its 4xx.
    """
    explicit = headers.get(MULTIPLEX_HEADER, "").strip()
    if explicit:
        return _clean(explicit)
    if method != "POST":
        return ""
    if path not in OPENAI_ROUTES and path not in LORAX_ROUTES:
        return ""
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return ""
    if not isinstance(data, dict):
        return ""
    if path in OPENAI_ROUTES:
        model = data.get("model")
        if not isinstance(model, str) or model == base_model:
            return ""
        return _clean(model)
    parameters = data.get("parameters")
    adapter = parameters.get("adapter_id") if isinstance(parameters, dict) else None
    return _clean(adapter) if isinstance(adapter, str) else ""


def wants_stream(path: str, body: bytes) -> bool:
    """Whether the response streams (SSE): /generate_stream, or `"stream": true`."""
    if path == "/generate_stream":
        return True
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("stream") is True


def _clean(adapter_id: str) -> str:
    if len(adapter_id) > MAX_ID_CHARS or not _ID_CHARS.match(adapter_id):
        return ""  # not an id any replica holds: route as base, the replica answers 4xx
    return adapter_id
