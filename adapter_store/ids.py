"""Adapter ids: what a user may call an adapter.

An id names a directory under the store's upload root, so it is checked before anything
else sees it, and it is never joined to a path unless it passed here. Paths come only from
the registry (a directory scan or an upload location), never from a request.
"""

from __future__ import annotations

import re

from loramux.adapter_store.errors import InvalidAdapterId

MAX_ADAPTER_ID_LEN = 128
# Ids the store gives derived adapters (merges, adapter_store/merged.py); users cannot take them.
DERIVED_PREFIX = "merge-"
# A leading alphanumeric rules out "", ".", "..", ".hidden" and "-option"; no "/" or "\".
_ADAPTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_adapter_id(adapter_id: object) -> str:
    """Return `adapter_id` if it is a valid id, else raise InvalidAdapterId saying why."""
    if not isinstance(adapter_id, str):
        raise InvalidAdapterId(adapter_id, f"must be a string, got {type(adapter_id).__name__}")
    if not adapter_id:
        raise InvalidAdapterId(adapter_id, "must not be empty")
    if len(adapter_id) > MAX_ADAPTER_ID_LEN:
        raise InvalidAdapterId(
            adapter_id, f"is {len(adapter_id)} characters long, more than {MAX_ADAPTER_ID_LEN}"
        )
    if _ADAPTER_ID.fullmatch(adapter_id) is None:
        raise InvalidAdapterId(
            adapter_id,
            "must start with a letter or digit and contain only letters, digits, '.', '_', '-'",
        )
    if ".." in adapter_id:
        raise InvalidAdapterId(adapter_id, "must not contain '..'")
    return adapter_id


def check_user_adapter_id(adapter_id: object) -> str:
    """check_adapter_id, and not a name reserved for derived adapters (registering, uploading)."""
    check_adapter_id(adapter_id)
    assert isinstance(adapter_id, str)
    if adapter_id.startswith(DERIVED_PREFIX):
        raise InvalidAdapterId(adapter_id, f"ids starting with {DERIVED_PREFIX!r} are reserved for merged adapters")
    return adapter_id


def is_valid_adapter_id(adapter_id: object) -> bool:
    try:
        check_user_adapter_id(adapter_id)
    except InvalidAdapterId:
        return False
    return True
