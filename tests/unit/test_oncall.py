"""On-call paging's decision: the first INTERNAL failure of a fingerprint pages, the same fingerprint stays quiet
for the window (counted from its last page, in event time), other fingerprints page on their own."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.projector import oncall
from services.projector.oncall import Failure

T0 = datetime(2026, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)


def failure(run_id: str, minutes: float, fingerprint: str = "fp-a") -> Failure:
    return Failure(run_id, "t1", "production", "f", fingerprint, "KeyError: 'cursor'", T0 + timedelta(minutes=minutes))


def test_once_per_fingerprint_per_window() -> None:
    failures = [failure("a0", 0), failure("a1", 1), failure("b0", 2, "fp-b"), failure("a2", 59.9),
                failure("a3", 60), failure("a4", 61), failure("a5", 121)]  # fmt: skip
    assert [f.run_id for f in oncall.due(failures, {}, HOUR)] == ["a0", "b0", "a3", "a5"]


def test_order_given_does_not_matter_and_earlier_pages_count() -> None:
    failures = [failure("a1", 30), failure("a0", 10)]
    assert [f.run_id for f in oncall.due(failures, {}, HOUR)] == ["a0"]
    # Paged 40 min before a0: a0 is quiet, a1 (70 min after that page) pages.
    assert [f.run_id for f in oncall.due(failures, {"fp-a": T0 - timedelta(minutes=40)}, HOUR)] == ["a1"]
    assert oncall.due(failures, {"fp-a": T0 + timedelta(minutes=5)}, HOUR) == []
    assert [f.run_id for f in oncall.due(failures, {"fp-a": T0 - timedelta(minutes=50)}, HOUR)] == ["a0"]


def test_the_page_names_run_tenant_flow_fingerprint_and_message() -> None:
    f = failure("a0", 0)
    body = oncall.body(f, HOUR)
    assert body["id"] == oncall.page_id(f) != oncall.page_id(failure("a1", 0))
    assert body["data"] == {"run_id": "a0", "tenant_id": "t1", "environment": "production", "flow_id": "f",
                            "fingerprint": "fp-a", "message": "KeyError: 'cursor'", "failed_at": T0.isoformat(),
                            "window_s": 3600.0}  # fmt: skip
