"""Closed-list parameters of the API: repeated or comma-separated, any case, and a 422 naming what is accepted."""

from __future__ import annotations

import pytest

from services.api.choices import known, many, one_of
from services.common.http import ApiError


def test_a_list_parameter_may_repeat_or_hold_commas() -> None:
    assert many(["FAILED,PARTIAL", " SUCCEEDED ", ",,"]) == ["FAILED", "PARTIAL", "SUCCEEDED"]
    assert many(None) == []


def test_a_choice_is_taken_in_any_case_and_an_unknown_one_is_named_with_the_accepted() -> None:
    assert one_of("trigger_type", ["API", "manual", "api"], ("api", "manual")) == ["api", "manual"]
    with pytest.raises(ApiError) as caught:
        one_of("trigger_type", ["api", "Carrier-Pigeon"], ("api", "manual"))
    assert (caught.value.status, caught.value.code) == (422, "validation_error")
    assert caught.value.message == "trigger_type: unknown 'Carrier-Pigeon'; accepted: api, manual"


def test_a_body_field_keeps_known_names_once_each_and_names_the_unknown() -> None:
    assert known(["runs:read", "admin", "runs:read"], ("admin", "runs:read"), "scope") == ["admin", "runs:read"]
    with pytest.raises(ValueError, match=r"^unknown scope\(s\) nope, zap; scopes: admin, runs:read$"):
        known(["zap", "admin", "nope"], ("admin", "runs:read"), "scope")
