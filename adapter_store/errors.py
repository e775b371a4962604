"""Typed adapter errors, raised where the problem is found; `server/api` maps them to HTTP codes.

Every error names the adapter, the file (or directory) at fault when there is one, and what
is wrong, so that a message alone is enough to fix the adapter:

    adapter 'my-id' (/adapters/my-id/adapter_model.safetensors): tensor '...lora_A.weight' ...
"""

from __future__ import annotations

from os import PathLike
from pathlib import PurePath


class AdapterError(Exception):
    """Base class. `adapter_id` is the user's id, `path` the file at fault (None if none)."""

    def __init__(self, adapter_id: str, path: str | PathLike[str] | None, reason: str) -> None:
        self.adapter_id = adapter_id
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(adapter_id, self.path, reason)

    def __str__(self) -> str:
        where = f" ({self.path})" if self.path is not None else ""
        return f"adapter {self.adapter_id!r}{where}: {self.reason}"

    def public_message(self) -> str:
        """The message for clients: the file's name only, never a path on this server
        (also where the reason quotes one, as an OSError's text does)."""
        if self.path is None:
            return encodable_text(str(self))
        path = PurePath(self.path)
        reason = self.reason
        for directory in (str(path), str(path.parent)):
            if len(directory) > 1:
                reason = reason.replace(directory, "<adapter>" if directory != str(path) else path.name)
        return encodable_text(f"adapter {self.adapter_id!r} ({path.name}): {reason}")


def encodable_text(text: str) -> str:
    """`text` with lone surrogates (from JSON escapes like \\ud800, or undecodable file
    names) written as escapes, so it encodes as UTF-8 in a JSON reply or a log."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class AdapterNotFound(AdapterError):
    """No such adapter, or its directory / a required file is missing."""


class AdapterInvalid(AdapterError):
    """The adapter's files are malformed or do not fit the base model."""


class AdapterTooLarge(AdapterError):
    """A module's rank exceeds the configured maximum rank."""

    def __init__(
        self,
        adapter_id: str,
        path: str | PathLike[str] | None,
        rank: int,
        max_rank: int,
        module: str | None = None,
    ) -> None:
        self.rank = rank
        self.max_rank = max_rank
        self.module = module
        at = f" at {module}" if module else ""
        super().__init__(
            adapter_id, path, f"rank {rank}{at} exceeds the configured max rank {max_rank}"
        )
        # Exception pickling replays self.args into __init__: keep them in its order.
        self.args = (adapter_id, self.path, rank, max_rank, module)


class AdapterUnsupported(AdapterError):
    """A valid PEFT adapter that uses a feature loramux does not serve; `feature` names it."""

    def __init__(
        self,
        adapter_id: str,
        path: str | PathLike[str] | None,
        feature: str,
        detail: str | None = None,
    ) -> None:
        self.feature = feature
        self.detail = detail
        reason = f"unsupported feature: {feature}" + (f" ({detail})" if detail else "")
        super().__init__(adapter_id, path, reason)
        self.args = (adapter_id, self.path, feature, detail)


class InvalidAdapterId(AdapterError):
    """An adapter id outside the allowed character set or length (see adapter_store.ids).

    `adapter_id` holds the offending value cut to 64 characters, so a message stays short.
    """

    def __init__(self, adapter_id: object, reason: str) -> None:
        shown = adapter_id if isinstance(adapter_id, str) else repr(adapter_id)
        if len(shown) > 64:
            shown = shown[:64] + "..."
        super().__init__(shown, None, reason)
        self.args = (adapter_id, reason)

    def __str__(self) -> str:
        return f"invalid adapter id {self.adapter_id!r}: {self.reason}"


class UploadTooLarge(AdapterTooLarge):
    """An upload's files exceed the store's max_upload_bytes (rank, max_rank: None here)."""

    def __init__(
        self, adapter_id: str, path: str | PathLike[str] | None, num_bytes: int, max_bytes: int
    ) -> None:
        self.num_bytes = num_bytes
        self.max_bytes = max_bytes
        self.rank = self.max_rank = None  # type: ignore[assignment]
        self.module = None
        AdapterError.__init__(
            self, adapter_id, path, f"upload is {num_bytes} bytes, more than the limit {max_bytes}"
        )
        self.args = (adapter_id, self.path, num_bytes, max_bytes)


class UploadsDisabled(AdapterError):
    """An upload was attempted on a store without an upload_root."""


class PinLimitExceeded(AdapterError):
    """A permanent pin would leave no device slot for the other adapters."""


class AdapterIdConflict(AdapterError):
    """An uploaded id differs only in case from one that has files in the upload area: on a
    case-insensitive filesystem the two would share a directory (and overwrite or delete
    each other's files), so the later one is refused."""
