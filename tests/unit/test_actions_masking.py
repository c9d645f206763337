"""Credentials in step inputs: masked in the ledger's StepStarted, yet the runner gets the real values."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.flows import MASK, contains_mask, is_secret_key, mask_secrets, mask_text
from services.executor.adapters.steps import runner_input
from services.executor.fold import fold_all
from tests.unit.drive import Run, error, make_flow, make_trigger

DSN = "postgresql://orders:s3cr3t-pw@db.example.com:5432/shop?sslmode=require"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (DSN, "postgresql://orders:***@db.example.com:5432/shop?sslmode=require"),
        ("postgres://u:p%40ss:w@h/db", "postgres://u:***@h/db"),
        (
            "https://user:pw@api.example.com/x?api_key=abc&page=2",
            "https://user:***@api.example.com/x?api_key=***&page=2",
        ),
        ("host=db user=u password=hunter2 dbname=x", "host=db user=u password=*** dbname=x"),
        ("postgresql://db.example.com/shop?user=u&password=pw", "postgresql://db.example.com/shop?user=u&password=***"),
        ("kafka://broker:9092", "kafka://broker:9092"),
        ("postgresql://orders@db/shop", "postgresql://orders@db/shop"),  # no password: nothing to hide
        ("plain text with no = secrets", "plain text with no = secrets"),
        ("SELECT * FROM t WHERE a = $1", "SELECT * FROM t WHERE a = $1"),
    ],
)
def test_passwords_inside_strings_are_masked(text: str, shown: str) -> None:
    assert mask_text(text) == shown


@pytest.mark.parametrize(
    "key", ["password", "db_password", "PASSWD", "client_secret", "token", "github_token", "X-Api-Key", "api_key",
            "Authorization", "Proxy-Authorization", "Cookie", "private_key", "aws_secret_access_key", "credentials"],
)  # fmt: skip
def test_secret_keys_are_recognised(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["max_tokens", "auth", "user", "secret_name", "Idempotency-Key", "dsn", "query"])
def test_ordinary_keys_are_not(key: str) -> None:
    assert not is_secret_key(key)


def test_a_step_input_is_masked_key_by_key_and_string_by_string() -> None:
    spec = {
        "dsn": DSN,
        "query": "SELECT 1",
        "params": [1, "password=x"],
        "headers": {"Authorization": "Bearer abc", "Accept": "json"},
        "token": {"nested": "anything"},
        "password": None,  # nothing there to hide
        "max_tokens": 5,
    }
    assert mask_secrets(spec) == {
        "dsn": "postgresql://orders:***@db.example.com:5432/shop?sslmode=require",
        "query": "SELECT 1",
        "params": [1, "password=***"],
        "headers": {"Authorization": MASK, "Accept": "json"},
        "token": MASK,
        "password": None,
        "max_tokens": 5,
    }
    assert contains_mask(mask_secrets(spec)) and not contains_mask({"query": "SELECT 1", "n": [1, {"a": "b"}]})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(value=json_values)
def test_masking_is_idempotent_and_keeps_the_shape(value: Any) -> None:
    once = mask_secrets(value)
    assert mask_secrets(once) == once
    assert type(once) is type(value) or (isinstance(value, tuple) and isinstance(once, list))


def _db_flow() -> Run:
    flow = make_flow(
        {"name": "lookup", "action": "database_query",
         "input": {"dsn": "postgresql://orders:{{ trigger.pw }}@db.example.com/shop", "query": "SELECT $1::int",
                   "params": ["{{ trigger.n }}"], "password": "literal-pw"}},
        retry={"delays_s": [1, 1]},
    )  # fmt: skip
    return Run(flow, make_trigger(payload={"pw": "from-trigger", "n": 7}))


def test_the_ledger_records_the_input_masked_and_the_runner_gets_it_whole() -> None:
    run = _db_flow()
    run.start()
    [started] = run.of_type("StepStarted")
    shown = {"dsn": "postgresql://orders:***@db.example.com/shop", "query": "SELECT $1::int", "params": [7]}
    assert started.payload.input == {**shown, "password": MASK}
    assert "literal-pw" not in started.model_dump_json()
    assert run.state is not None and run.flow is not None
    real = {"dsn": "postgresql://orders:from-trigger@db.example.com/shop", "query": "SELECT $1::int", "params": [7],
            "password": "literal-pw"}  # fmt: skip
    assert runner_input(run.state, run.flow.step("lookup")) == real
    # After a crash the state is rebuilt from the ledger alone: the runner still gets the real input.
    assert runner_input(fold_all(run.events), run.flow.step("lookup")) == real  # type: ignore[arg-type]
    # And on a retry attempt too.
    run.complete(ok=False, err=error("TRANSIENT"))
    run.fire_timer()
    assert run.of_type("StepStarted")[1].payload.input == started.payload.input
    assert runner_input(run.state, run.flow.step("lookup")) == real


def test_an_input_with_nothing_secret_is_passed_as_recorded() -> None:
    run = Run(make_flow({"name": "a", "input": {"output": {"n": "{{ trigger.n }}"}}}), make_trigger(payload={"n": 1}))
    run.start()
    assert run.state is not None and run.flow is not None
    recorded = run.state.steps["a"].input
    assert runner_input(run.state, run.flow.step("a")) is recorded
