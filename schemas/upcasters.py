"""Upcasters: functions `upcast_<type>_v<n>_v<n+1>(dict) -> dict` run before validation (architecture.md: events).

No breaking change has shipped yet, so the table is empty; a change that bumps an event's
schema_version adds its function here and a test that decodes a stored v<n> event.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

# (event type, from schema_version) → function producing the next version.
UPCASTERS: dict[tuple[str, int], Upcaster] = {}


class UpcastError(ValueError):
    """An upcaster that failed on its input; the codec reports it as a DecodeError."""


def _key(data: dict[str, Any]) -> tuple[str, int] | None:
    """The (type, schema_version) an upcaster is looked up by, or None when the envelope's values are malformed.

    Malformed values (a non-string `type`, a `schema_version` that is not an integer) are left for
    validation to reject with a precise reason; they never crash the lookup.
    """
    kind = data.get("type", "")
    version = data.get("schema_version", 1)
    if not isinstance(kind, str):
        return None
    if isinstance(version, bool):
        return None
    if isinstance(version, int):
        return kind, version
    # The same integer-like values validation accepts in lax mode: "2" and 2.0.
    if isinstance(version, float) and version.is_integer():
        return kind, int(version)
    if isinstance(version, str):
        try:
            return kind, int(version)
        except ValueError:
            return None
    return None


def upcast(data: dict[str, Any]) -> dict[str, Any]:
    """Bring `data` to its type's current schema_version; raises only UpcastError."""
    while (key := _key(data)) is not None and (fn := UPCASTERS.get(key)) is not None:
        try:
            upcasted = fn(data)
        except Exception as exc:  # an upcaster meeting data it cannot handle: the input is malformed
            raise UpcastError(f"cannot upcast {key[0]} from schema_version {key[1]}: {exc!r}") from exc
        if not isinstance(upcasted, dict):
            raise UpcastError(f"upcasting {key[0]} from schema_version {key[1]} did not produce an object")
        data = upcasted
    return data
