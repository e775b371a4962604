"""loramux clients: `Client` / `AsyncClient` (httpx) and the `loramux generate|chat|adapters` commands.

Needs only httpx: nothing here imports the server, torch, or the other rooms.
"""

from loramux.clients.client import DEFAULT_URL, AsyncClient, Client
from loramux.clients.errors import (
    APIConnectionError,
    AuthenticationError,
    InvalidAdapterPath,
    LoramuxError,
    NotFoundError,
    RateLimitError,
    ServerError,
    ValidationError,
)
from loramux.clients.types import (
    AdapterInfo,
    ChatDelta,
    ChatResult,
    GenerateResult,
    ModelInfo,
    StreamEvent,
    Token,
    Usage,
)

__all__ = [
    "DEFAULT_URL",
    "APIConnectionError",
    "AdapterInfo",
    "AsyncClient",
    "AuthenticationError",
    "ChatDelta",
    "ChatResult",
    "Client",
    "GenerateResult",
    "InvalidAdapterPath",
    "LoramuxError",
    "ModelInfo",
    "NotFoundError",
    "RateLimitError",
    "ServerError",
    "StreamEvent",
    "Token",
    "Usage",
    "ValidationError",
]
