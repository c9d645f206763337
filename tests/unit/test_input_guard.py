"""The byte-level input checks and the timestamp and number rules of the HTTP contract (docs/api-contract.md)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import BaseModel, Field, ValidationError

from services.api.querystring import QueryString
from services.common.contract import INT32_MAX, Timestamp, parse_count, parse_timestamp
from services.common.http import body_problem


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": "x"}',
        b'{"a": "\\ud83d\\ude00"}',  # a surrogate pair is one character
        b'{"a": "\\\\u0000"}',  # an escaped backslash, then the text u0000
        b'{"a": "\\\\\\\\", "b": "\\n\\t\\"\\u00e9"}',
        b'{"a": 9223372036854775807, "b": -9223372036854775808, "c": 1e308, "d": 1.5e-999}',
        b'{"a": "12345678901234567890123", "b": "NaN and Infinity are words"}',
        b"{not json 99999999999999999999",  # malformed: FastAPI's own parse reports it
        b"",
    ],
)
def test_ordinary_bodies_pass(body: bytes) -> None:
    assert body_problem(body) is None


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b'{"a": "\\u0000"}', 400),
        (b'{"\\u0000": 1}', 400),
        (b'{"a": "x\\ud800"}', 400),
        (b'{"a": "\\udc00"}', 400),
        (b'{"a": "\\ud83d\\ud83d\\ude00"}', 400),
        (b'{"a": "\\uD800\\\\"}', 400),
        (b'{"a": "\\\\\\u0000"}', 400),  # an escaped backslash, then a real \u0000
        (b'{"a": 9223372036854775808}', 422),
        (b'{"a": [-9223372036854775809]}', 422),
        (b'{"a": 1e999}', 422),
        (b'{"a": -1E+400}', 422),
        (b'{"a": NaN}', 422),
        (b'{"a": -Infinity}', 422),
    ],
)
def test_bodies_postgresql_or_kafka_cannot_take_are_refused(body: bytes, status: int) -> None:
    problem = body_problem(body)
    assert problem is not None and problem[0] == status, problem


def test_a_large_ordinary_body_is_checked_quickly() -> None:
    import time

    body = b'{"inputs": [' + b",".join(b'{"order": "SO-%d", "total": %d}' % (i, i) for i in range(100_000)) + b"]}"
    started = time.perf_counter()
    assert body_problem(body) is None
    assert time.perf_counter() - started < 0.25  # ~10 ms on the bench machine; a regex scan took ~200 ms


class _Times(BaseModel):
    at: Timestamp


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-01T00:00:00Z", datetime(2026, 1, 1, tzinfo=UTC)),
        ("2026-01-01t01:00:00+01:00", datetime(2026, 1, 1, tzinfo=UTC)),
        ("2026-01-01 00:00:00.250z", datetime(2026, 1, 1, 0, 0, 0, 250_000, tzinfo=UTC)),
    ],
)
def test_timestamps_with_an_offset_are_read_in_utc(text: str, expected: datetime) -> None:
    assert _Times(at=text).at == expected  # type: ignore[arg-type]
    assert parse_timestamp(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "2026-01-01T00:00:00",
        "2026-01-01",
        "1700000000",
        "yesterday",
        "9999-12-31T23:59:59-23:00",
        "0001-01-01T00:00:00+01:00",
    ],
)
def test_other_times_are_refused(text: str) -> None:
    with pytest.raises(ValidationError):
        _Times(at=text)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        parse_timestamp(text)


def test_counts_fit_their_column() -> None:
    assert parse_count("0") == 0
    assert parse_count(str(INT32_MAX)) == INT32_MAX
    for text in (str(INT32_MAX + 1), "99999999999999999999", "²", "-1", "1.0", ""):
        with pytest.raises(ValueError):
            parse_count(text)


class _Query(BaseModel):
    flow_id: list[str] = Field(default_factory=list)
    failed_step: str | None = None


def test_query_string_aliases_and_array_forms_are_documented() -> None:
    qs = QueryString(_Query, {"flowId": "flow_id", "failedStepName": "failed_step"})
    names = {p["name"] for p in qs.openapi()["parameters"]}
    assert names == {"flow_id", "failed_step", "flowId", "failedStepName", "flow_id[]", "flowId[]"}
