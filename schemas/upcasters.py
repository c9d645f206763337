"""Upcasters: functions `upcast_<type>_v<n>_v<n+1>(dict) -> dict` run before validation (DESIGN 4).

No breaking change has shipped yet, so the table is empty; a change that bumps an event's
schema_version adds its function here and a test that decodes a stored v<n> event.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

# (event type, from schema_version) → function producing the next version.
UPCASTERS: dict[tuple[str, int], Upcaster] = {}


def upcast(data: dict[str, Any]) -> dict[str, Any]:
    while (fn := UPCASTERS.get((data.get("type", ""), int(data.get("schema_version", 1))))) is not None:
        data = fn(data)
    return data
