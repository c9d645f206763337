"""Page cursors: the one codec behind every `cursor` / `next_cursor` of the HTTP services.

A cursor is the position of the last row a page showed (its sort key and id), as JSON in base64url without
padding: opaque to clients, stable across processes. Each list declares the shape of its position as a type
(`tuple[datetime, str]`, a pydantic model …); a cursor that does not decode to that shape is refused with the
same 400 `invalid_request` everywhere (docs/api-contract.md).
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any, Generic, TypeVar

import orjson
from pydantic import TypeAdapter

from services.common.http import ApiError

T = TypeVar("T")


class InvalidCursor(ApiError):
    """A cursor this API did not hand out, or one handed out for another query: 400 `invalid_request`."""

    def __init__(self, reason: str = "not one this API returned") -> None:
        super().__init__(400, "invalid_request", f"cursor: {reason}")


class CursorCodec(Generic[T]):
    """Encodes a list's position into a cursor and decodes it back, validated against the position's type."""

    def __init__(self, shape: Any) -> None:
        self._adapter: TypeAdapter[T] = TypeAdapter(shape)

    def encode(self, position: T) -> str:
        raw = orjson.dumps(self._adapter.dump_python(position, mode="json", by_alias=True))
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def decode(self, text: str) -> T:
        """The position, or InvalidCursor (never another exception, whatever the text)."""
        try:
            raw = base64.urlsafe_b64decode(text.encode("ascii") + b"=" * (-len(text) % 4))
            if b"\\u0000" in raw:
                raise ValueError("a NUL character, which PostgreSQL refuses")
            return self._adapter.validate_python(orjson.loads(raw))
        except (ValueError, TypeError):  # bad base64, JSON or shape (binascii.Error, ValidationError: ValueErrors)
            raise InvalidCursor() from None


TIME_AND_ID: CursorCodec[tuple[datetime, str]] = CursorCodec(tuple[datetime, str])
"""The position of a list ordered by a timestamp and an id (flows by creation, alerts by firing, records by update)."""
