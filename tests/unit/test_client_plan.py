"""The client's pure parts (flowtrail/client/plan.py, docs/client.md): how long it waits before a retry and when it
stops, how an event stream's lines become events, how keyword filters become a query string."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import httpx

from flowtrail.client.plan import RetryPolicy, SSEDecoder, query, retry_after


def test_retries_stop_at_the_attempts_or_the_total_time_and_honour_retry_after() -> None:
    policy = RetryPolicy(max_attempts=3, max_total_s=10, backoff_s=1, max_backoff_s=3)
    now = time.monotonic()
    assert policy.wait(1, now, 2.5) == 2.5  # the API's Retry-After, as asked
    assert 0.5 <= (policy.wait(1, now, None) or 0) <= 1  # backoff: between half and all of 1 s
    assert 1 <= (policy.wait(2, now, None) or 0) <= 2  # doubled
    assert policy.wait(3, now, None) is None  # the third send was the last
    assert policy.wait(1, now, 11) is None  # a wait past the total time: give up now
    assert policy.wait(2, now - 9.5, 1) is None  # 9.5 s spent already
    assert all(1.5 <= policy.backoff(n) <= 3 for n in range(3, 30))  # capped at max_backoff_s


def test_retry_after_is_read_as_seconds_or_an_http_date() -> None:
    def answer(value: str) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": value})

    assert retry_after(answer("2")) == 2 and retry_after(answer("0.5")) == 0.5
    in_a_minute = datetime.fromtimestamp(time.time() + 60, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert 55 <= (retry_after(answer(in_a_minute)) or 0) <= 60
    assert retry_after(answer("Wed, 21 Oct 2015 07:28:00 GMT")) == 0  # past: at once
    assert retry_after(answer("soon")) is None and retry_after(httpx.Response(503)) is None


def test_event_stream_lines_become_events() -> None:
    decoder = SSEDecoder()
    lines = [": ping - 2026-01-01", "", "id: 3", "event: StepSucceeded", 'data: {"a":', "data: 1}", "",
             "retry: 1000", "data:no-space", ""]  # fmt: skip
    events = [e for e in map(decoder.feed, lines) if e is not None]
    assert [(e.id, e.event, e.data) for e in events] == [
        ("3", "StepSucceeded", '{"a":\n1}'),
        ("3", "message", "no-space"),  # the last id stays until another is given
    ]


def test_filters_become_a_query_string() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    params = query({"status": ["FAILED", "PARTIAL"], "flow_id": "f", "include_archived": True, "q": None,
                    "created_after": at, "limit": 5})  # fmt: skip
    assert str(params) == (
        "status=FAILED&status=PARTIAL&flow_id=f&include_archived=true&created_after=2026-01-02T03%3A04%3A05%2B00%3A00"
        "&limit=5"
    )
