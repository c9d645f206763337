"""The one cursor codec: a position survives the round trip, and anything else is the same 400 everywhere."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.api.adapters.runs import Cursor, Sort
from services.common.cursor import TIME_AND_ID, CursorCodec, InvalidCursor


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@given(st.datetimes(timezones=st.just(UTC)), st.text(max_size=50).filter(lambda s: "\x00" not in s))
def test_a_time_and_id_position_round_trips(at: datetime, row_id: str) -> None:
    cursor = TIME_AND_ID.encode((at, row_id))
    assert "=" not in cursor and "+" not in cursor and "/" not in cursor  # safe in a query string as is
    assert TIME_AND_ID.decode(cursor) == (at, row_id)


@pytest.mark.parametrize(
    "text",
    ["", "!!!", "é", _b64(b"not json"), _b64(b'{"a": 1}'), _b64(b'["2026-01-01T00:00:00Z"]'),
     _b64(b'["yesterday", "x"]'), _b64(b'["2026-01-01T00:00:00Z", 7]'), _b64(b'["2026-01-01T00:00:00Z", "a\\u0000"]')],
)  # fmt: skip
def test_anything_not_handed_out_is_the_same_400(text: str) -> None:
    with pytest.raises(InvalidCursor) as caught:
        TIME_AND_ID.decode(text)
    assert (caught.value.status, caught.value.code) == (400, "invalid_request")
    assert caught.value.message == "cursor: not one this API returned"


@given(st.text(max_size=200))
def test_decoding_never_raises_anything_but_invalid_cursor(text: str) -> None:
    try:
        CursorCodec(str).decode(text)
    except InvalidCursor:
        pass


@pytest.mark.parametrize(
    ("sort", "value"),
    [("-created_at", datetime(2026, 11, 20, 8, 30, 0, 123456, tzinfo=UTC)), ("duration", 1500.5), ("status", "FAILED")],
)
def test_a_runs_cursor_keeps_its_sort_value_and_direction(sort: str, value: object) -> None:
    order = Sort.parse(sort)
    cursor = Cursor(str(order), value, "run_1", backward=True)
    assert Cursor.decode(cursor.encode(), order) == cursor


def test_a_runs_cursor_of_another_sort_is_refused_naming_the_sort() -> None:
    cursor = Cursor("-duration", 12.0, "run_1").encode()
    with pytest.raises(InvalidCursor) as caught:
        Cursor.decode(cursor, Sort.parse("created_at"))
    assert caught.value.status == 400 and "sort=-duration" in caught.value.message
    not_a_time = Cursor("created_at", "yesterday", "run_1").encode()
    with pytest.raises(InvalidCursor) as caught:
        Cursor.decode(not_a_time, Sort.parse("created_at"))
    assert caught.value.message == "cursor: not one this API returned"
