"""Step outputs as plain JSON, capped; errors of PostgreSQL, Kafka and user code sorted into the error categories."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from enum import Enum
from typing import Any

import orjson
import pytest
from aiokafka import errors as kerr

from schemas.events import ErrorCategory
from services.executor.adapters.actions_base import TRUNCATED, cap_output, json_safe
from services.executor.adapters.actions_db import classify_sqlstate, coerce_param
from services.executor.adapters.actions_kafka import classify_kafka
from services.executor.adapters.actions_python import ActionError


class Color(Enum):
    RED = "red"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Decimal("12.50"), 12.5),
        (Decimal("3"), 3),
        (Decimal("0.1"), 0.1),
        (Decimal("123456789012345678901234567890.123456789"), "123456789012345678901234567890.123456789"),
        (Decimal("NaN"), "NaN"),
        (float("inf"), "inf"),
        (dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC), "2024-05-01T12:00:00+00:00"),
        (dt.date(2024, 5, 1), "2024-05-01"),
        (dt.timedelta(minutes=1, seconds=30), 90.0),
        (uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001"),
        (b"\x01\xff", "\\x01ff"),
        (Color.RED, "red"),
        ({1: (1, 2), "s": {3}}, {"1": [1, 2], "s": [3]}),
    ],
)
def test_values_become_plain_json(value: Any, expected: Any) -> None:
    assert json_safe(value) == expected
    orjson.dumps(json_safe(value))


def test_unknown_types_go_to_the_fallback_or_are_refused() -> None:
    assert json_safe({"at": object}, fallback=lambda v: "other") == {"at": "other"}
    with pytest.raises(TypeError, match="object is not JSON"):
        json_safe([object()])


def test_a_large_output_is_replaced_by_a_marked_preview() -> None:
    small = {"n": 1}
    assert cap_output(small, 100) is small
    capped = cap_output({"blob": "x" * 1000}, 100)
    assert capped["truncated"] is True and capped["size_bytes"] == 1011
    assert capped["preview"].startswith('{"blob":"xxx') and capped["preview"].endswith(TRUNCATED)


@pytest.mark.parametrize(
    ("sqlstate", "category"),
    [
        ("28P01", "AUTH"), ("28000", "AUTH"), ("42501", "AUTH"),
        ("23505", "CONFLICT"), ("40001", "CONFLICT"), ("40P01", "CONFLICT"), ("55P03", "CONFLICT"),
        ("57014", "TRANSIENT"), ("08006", "TRANSIENT"), ("53300", "TRANSIENT"), ("57P03", "TRANSIENT"),
        ("42601", "VALIDATION"), ("42P01", "VALIDATION"), ("23502", "VALIDATION"), ("22P02", "VALIDATION"),
        ("25006", "VALIDATION"), (None, "VALIDATION"),
    ],
)  # fmt: skip
def test_sqlstates_map_to_categories(sqlstate: str | None, category: str) -> None:
    assert classify_sqlstate(sqlstate) == ErrorCategory(category)


@pytest.mark.parametrize(
    ("exc", "category"),
    [
        (kerr.TopicAuthorizationFailedError(), "AUTH"),
        (kerr.SaslAuthenticationFailed(), "AUTH"),
        (kerr.KafkaTimeoutError(), "TRANSIENT"),
        (kerr.KafkaConnectionError(), "TRANSIENT"),
        (kerr.NotLeaderForPartitionError(), "TRANSIENT"),
        (ConnectionRefusedError(), "TRANSIENT"),
        (kerr.CommitFailedError(), "CONFLICT"),
        (kerr.MessageSizeTooLargeError(), "VALIDATION"),
        (kerr.InvalidTopicError(), "VALIDATION"),
    ],
)
def test_kafka_errors_map_to_categories(exc: BaseException, category: str) -> None:
    assert classify_kafka(exc) == ErrorCategory(category)


def test_json_parameters_become_the_sql_type_asyncpg_binds() -> None:
    assert coerce_param("timestamptz", "2024-05-01T12:00:00Z") == dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC)
    assert coerce_param("date", "2024-05-01") == dt.date(2024, 5, 1)
    assert coerce_param("numeric", 12.5) == Decimal("12.5") and coerce_param("numeric", "7.25") == Decimal("7.25")
    assert coerce_param("int8", "42") == 42 and coerce_param("int4", 3.0) == 3
    assert coerce_param("float8", 2) == 2.0 and coerce_param("text", 5) == "5"
    assert coerce_param("_int4", ["1", 2]) == [1, 2]
    # What cannot be converted goes to the server as is: its error names the parameter.
    assert coerce_param("int4", "seven") == "seven" and coerce_param("timestamptz", "soon") == "soon"
    assert coerce_param("int4", None) is None and coerce_param("bool", True) is True


def test_action_errors_choose_their_category() -> None:
    assert ActionError("x", category="transient").category == ErrorCategory.TRANSIENT
    assert ActionError("x", category=ErrorCategory.CONFLICT).category == ErrorCategory.CONFLICT
    assert ActionError("x").category == ErrorCategory.INTERNAL
    assert ActionError("x", category="bogus").category == ErrorCategory.INTERNAL


async def test_every_action_output_past_the_limit_is_recorded_as_a_marked_preview() -> None:
    from datetime import UTC, datetime

    from services.executor.adapters.steps import StepCall, StepRunners

    runners = StepRunners(allow_private_networks=False, time_scale=1.0, max_body_bytes=1024, max_output_bytes=200)
    try:

        def call(output: Any) -> StepCall:
            return StepCall(run_id="r", step="s", action="transform", attempt=1, input={"output": output},
                            started_at=datetime.now(UTC), timeout_s=5)  # fmt: skip

        big = await runners.run(call({"rows": ["x" * 50] * 20}))
        small = await runners.run(call({"rows": ["x"]}))
    finally:
        await runners.close()
    assert big.ok and big.output["truncated"] is True and big.output["size_bytes"] > 1000
    assert big.output["preview"].endswith("…[truncated]") and len(big.output["preview"]) <= 200 + len("…[truncated]")
    assert small.output == {"rows": ["x"]}
