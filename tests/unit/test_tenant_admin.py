"""The pure parts of tenant administration (docs/tenants.md): the bounds an operator's retention and quota settings
are held to, the purge plan each tenant's periods give, and the operator key file `flowtrail up` writes."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from deploy.launcher.tenants_cmd import OPERATOR_KEY_PREFIX, ensure_operator_key
from services.api.models.admin import MAX_RETENTION_DAYS, retention_problem
from services.api.routes.admin import NewTenantBody, QuotasBody, RetentionBody, TenantPatch
from services.projector.retention import Marks, plan

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("metadata", "payload"), [(90, 7), (396, 396), (1, 1), (MAX_RETENTION_DAYS, 30)])
def test_payloads_kept_no_longer_than_their_runs_are_accepted(metadata: int, payload: int) -> None:
    assert retention_problem(metadata, payload) is None
    assert RetentionBody(metadata_days=metadata, payload_days=payload).payload_days == payload


def test_payloads_kept_longer_than_their_runs_are_refused_with_both_numbers_named() -> None:
    problem = retention_problem(30, 31)
    assert problem is not None and "31" in problem and "30" in problem and "payload_days" in problem


@pytest.mark.parametrize(
    "body",
    [
        {"metadata_days": 0},
        {"metadata_days": MAX_RETENTION_DAYS + 1},
        {"payload_days": 0},
        {"payload_days": -7},
        {"metadata_days": 1.5},
        {"months": 13},
    ],
)
def test_retention_out_of_range_or_unknown_is_refused(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        RetentionBody.model_validate(body)


def test_quotas_names_and_ids_are_bounded() -> None:
    assert QuotasBody.model_validate({"max_active_runs": None}).max_active_runs is None
    for bad in ({"max_active_runs": 0}, {"max_active_runs": 10**7}):
        with pytest.raises(ValidationError):
            QuotasBody.model_validate(bad)
    for tenant_id in ("Upper", "-dash-first", "a" * 64, "spa ce", ""):
        with pytest.raises(ValidationError):
            NewTenantBody.model_validate({"name": "x", "id": tenant_id})
    assert NewTenantBody.model_validate({"name": "x", "id": "acme-eu_1"}).id == "acme-eu_1"
    with pytest.raises(ValidationError):
        TenantPatch.model_validate({"name": ""})
    # An explicit null quota is a change (back to none of its own); a missing one is not.
    assert TenantPatch.model_validate({"quotas": {"max_active_runs": None}}).quotas is not None
    assert TenantPatch.model_validate({}).quotas is None


def test_the_purge_plan_gives_each_tenant_its_own_marks() -> None:
    marks = plan([("std", 90, 7), ("enterprise", 396, 30)], NOW)
    assert marks == [
        Marks("std", NOW - timedelta(days=90), NOW - timedelta(days=7)),
        Marks("enterprise", NOW - timedelta(days=396), NOW - timedelta(days=30)),
    ]
    assert plan([], NOW) == []


def test_the_operator_key_file_is_written_once_readable_by_its_owner_only(tmp_path: Path) -> None:
    key = ensure_operator_key(tmp_path / "state")
    path = tmp_path / "state" / "operator_key"
    assert key.startswith(OPERATOR_KEY_PREFIX) and len(key) > 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_operator_key(tmp_path / "state") == key  # the next `flowtrail up` keeps it
    assert ensure_operator_key(tmp_path / "other") != key
