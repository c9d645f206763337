"""A keyed trigger's origin headers (services/common/trigger_origin.py): the manual marker and the nested-run
headers are checked before anything is appended, each refusal naming its header."""

from __future__ import annotations

import pytest

from schemas.events import TriggerType
from services.common.http import ApiError
from services.common.trigger_origin import Origin, parse_origin


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, Origin()),
        ({"x-flowtrail-trigger": "manual"}, Origin(TriggerType.MANUAL)),
        ({"x-flowtrail-trigger": " Manual "}, Origin(TriggerType.MANUAL)),
        ({"x-flowtrail-trigger": "api"}, Origin()),
        ({"ap-parent-run-id": "run_1"}, Origin(parent_run_id="run_1")),
        ({"ap-parent-run-id": "run_1", "ap-fail-parent-on-failure": "TRUE"}, Origin(TriggerType.API, "run_1", True)),
        ({"ap-parent-run-id": "run_1", "ap-fail-parent-on-failure": "false"}, Origin(parent_run_id="run_1")),
        ({"ap-fail-parent-on-failure": "false"}, Origin()),
    ],
)
def test_origins(headers: dict[str, str], expected: Origin) -> None:
    assert parse_origin(headers) == expected


@pytest.mark.parametrize(
    ("headers", "named"),
    [
        ({"x-flowtrail-trigger": "webhook"}, "X-Flowtrail-Trigger"),  # only ingest's hook URL records webhook
        ({"x-flowtrail-trigger": "schedule"}, "X-Flowtrail-Trigger"),
        ({"ap-parent-run-id": ""}, "ap-parent-run-id"),
        ({"ap-parent-run-id": "r" * 101}, "ap-parent-run-id"),
        ({"ap-parent-run-id": "rün"}, "ap-parent-run-id"),
        ({"ap-parent-run-id": "run_1", "ap-fail-parent-on-failure": "yes"}, "ap-fail-parent-on-failure"),
        ({"ap-fail-parent-on-failure": "true"}, "needs ap-parent-run-id"),
    ],
)
def test_bad_origin_headers_are_422_naming_the_header(headers: dict[str, str], named: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_origin(headers)
    assert caught.value.status == 422 and named in caught.value.message
