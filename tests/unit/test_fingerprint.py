"""Failure-group fingerprints and endpoint routes: errors that differ only in an id are one group, and a path that
differs only in an id is one endpoint — for every id form a run meets, not one example of each."""

from __future__ import annotations

import pytest

from services.common.runfold.fingerprint import fingerprint, normalise, route

# Pairs of values of one id form, as they appear in error messages and URLs.
ID_FORMS = {
    "number": ("42", "1042"),
    "uuid": ("0b6f0e55-7a7c-4a39-9f55-1c61b1d2f7a1", "9f8e7d6c-5b4a-4c3d-8e2f-1a0b9c8d7e6f"),
    "long hex": ("6f1c2a9b8e7d4c3b", "a1b2c3d4e5f60718"),
    "run id": ("run_0193e5c2a1b47f3d9c8e2a1b", "run_0193e5c2a1b5aa00ffee9911"),
    "child run id": ("run_child_8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a", "run_child_1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d"),
    "scheduled run id": ("run_sched_t1_f_20261206T010000Z", "run_sched_t1_f_20261206T020000Z"),
    "prefixed id": ("del_3f9a0c1e2d4b", "del_77aa01bc3d9e"),
    "stripe-style id": ("cus_NffrFeUfNV2Hib", "cus_Q8xYz2LmN4pRtu"),
    "opaque short id": ("u-bdb68b43", "u-7c1e90fa"),
    "business key": ("SO-1042", "SO-7"),
    "email": ("ann@example.com", "bob.smith+x@corp.example.org"),
    "timestamp": ("2026-12-06T01:02:03Z", "2026-11-30T23:59:59.123+01:00"),
    "quoted value": ("'Please enter value(s) for: Email'", "'Please enter value(s) for: Phone'"),
}


@pytest.mark.parametrize("form", ID_FORMS, ids=list(ID_FORMS))
def test_messages_that_differ_in_an_id_have_one_fingerprint(form: str) -> None:
    a, b = ID_FORMS[form]
    template = "POST /v1/orders failed for {} (upstream said no)"
    assert normalise(template.format(a)) == normalise(template.format(b)), form
    assert fingerprint("f", "push", "TRANSIENT", template.format(a)) == fingerprint(
        "f", "push", "TRANSIENT", template.format(b)
    )


@pytest.mark.parametrize("form", [f for f in ID_FORMS if f not in ("email", "timestamp", "quoted value")])
def test_paths_that_differ_in_an_id_are_one_route(form: str) -> None:
    a, b = ID_FORMS[form]
    assert route(f"/users/{a}/orders") == route(f"/users/{b}/orders") == "/users/{id}/orders", form


@pytest.mark.parametrize(
    "path", ["/v1/orders", "/admin/api/2024-10/orders.json", "/oauth2/token", "/api/v2/users", "/s3/buckets"]
)
def test_named_segments_and_versions_stay(path: str) -> None:
    assert route(path) == path


def test_different_errors_stay_different() -> None:
    assert normalise("token expired") != normalise("token revoked")
    assert fingerprint("f", "a", "AUTH", "x") != fingerprint("f", "b", "AUTH", "x")  # another step


def test_an_apostrophe_is_no_quote() -> None:
    pattern = normalise("the flow's step 'push' can't reach 'erp'")
    assert pattern == "the flow's step <str> can't reach <str>"
