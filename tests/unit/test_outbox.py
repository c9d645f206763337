"""The outbox dispatcher's schedule: exponential backoff capped at an hour, and the 24-hour give-up."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.common.outbox import RETRY_FOR, Outbox, Queue

T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
_QUEUE = Queue(table="webhook_deliveries", owner="webhook_subscriptions", owner_match="o.id = d.subscription_id",
               columns="d.body")  # fmt: skip


async def _never(_: object) -> int:
    raise AssertionError("not sent in these tests")


def _outbox(backoff_s: float = 10) -> Outbox:
    return Outbox(_QUEUE, _never, backoff_s=backoff_s, lease_s=60, noun="webhook")


def test_each_retry_waits_twice_as_long_up_to_an_hour() -> None:
    outbox = _outbox(backoff_s=10)
    assert [outbox.delay(n).total_seconds() for n in range(1, 6)] == [10, 20, 40, 80, 160]
    assert outbox.delay(12) == timedelta(hours=1)
    assert outbox.delay(500) == timedelta(hours=1)  # no overflow far past the cap


def test_a_delivered_attempt_is_delivered_whenever_it_happens() -> None:
    assert _outbox().settle(1, None, T0, T0)[0] == "delivered"
    assert _outbox().settle(40, None, T0, T0 + RETRY_FOR + timedelta(hours=5))[0] == "delivered"


@pytest.mark.parametrize(
    ("elapsed", "status"),
    [(timedelta(0), "pending"), (RETRY_FOR - timedelta(hours=1), "pending"),
     (RETRY_FOR - timedelta(minutes=59), "failed"), (RETRY_FOR, "failed")],
)  # fmt: skip
def test_a_failure_is_retried_until_the_next_try_would_fall_past_24_hours(elapsed: timedelta, status: str) -> None:
    now = T0 + elapsed
    got, retry_at = _outbox().settle(20, "answered 503", T0, now)  # attempt 20: the hour-long cap applies
    assert (got, retry_at) == (status, now + timedelta(hours=1))


def test_the_claim_takes_due_pending_rows_of_its_own_table_with_a_lease() -> None:
    sql = " ".join(_QUEUE.claim_sql().split())
    assert sql.startswith("UPDATE webhook_deliveries d SET next_attempt_at = now() + make_interval(secs => $1)")
    assert "FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= now()" in sql
    assert "FOR UPDATE SKIP LOCKED" in sql and "FROM webhook_subscriptions o" in sql
    assert sql.endswith("RETURNING d.id, d.attempts, d.first_attempt_at, d.body")
