"""Request bodies accept only the fields this server acts on.

A field a client sends and the server silently drops gives wrong results that no one is
told about (a bias not applied, a guard not set), so a request naming a field the model
does not declare is refused with a 4xx naming it. A null value is let through: clients
such as lorax-client send every field they know, unset ones as null.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from loramux.server.service import InvalidRequest

# Bodies keep unknown keys (so they can be named in the refusal); NaN/Infinity: 4xx naming the field.
KEEP_UNKNOWN = ConfigDict(extra="allow", allow_inf_nan=False)


def refuse_unknown_fields(body: BaseModel, prefix: str = "") -> None:
    """InvalidRequest naming the first non-null field `body` does not declare."""
    for name, value in (body.model_extra or {}).items():
        if value is not None:
            field = f"{prefix}{name}"
            raise InvalidRequest(
                f"{field} is not supported by this server (a field it would ignore is refused)", field
            )
