"""Flow definitions: what a valid flow looks like, and the clear errors a bad one gets."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.flows import FlowDefinition, RetryPolicy, StepAction, StepDefinition


def flow_dict(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "order-sync_2",
        "tenant_id": "t1",
        "name": "Order sync",
        "version": 1,
        "steps": [
            {"name": "fetch", "action": "http_request", "input": {"url": "https://example.com/{{ trigger.id }}"},
             "assertions": [{"expression": "status", "expected": 200}], "extract": {"body": "body"},
             "retry": {"delays_s": [1, 2]}, "timeout_s": 5},
            {"name": "shape", "action": "transform", "run_condition": "vars.body"},
        ],
    }  # fmt: skip
    return base | changes


def errors_of(data: dict[str, Any]) -> list[dict[str, Any]]:
    with pytest.raises(ValidationError) as info:
        FlowDefinition.model_validate(data)
    return info.value.errors()


def step_errors(step: dict[str, Any]) -> list[dict[str, Any]]:
    """Errors for a flow of one good step and this one (alone, a bad step also trips `steps` min_length)."""
    return errors_of(flow_dict(steps=[{"name": "ok", "action": "transform"}, step]))


def test_a_valid_flow_and_its_defaults() -> None:
    flow = FlowDefinition.model_validate(flow_dict())
    assert [s.name for s in flow.steps] == ["fetch", "shape"]
    assert flow.steps[0].action == StepAction.HTTP_REQUEST
    assert flow.environment == "PRODUCTION" and flow.trigger.type == "manual" and flow.tags == ()
    assert flow.retry == RetryPolicy(delays_s=(1, 5, 30, 300, 1800, 7200), max_elapsed_s=86400)
    assert flow.retry.retry_conflict_once is True
    assert flow.steps[1].retry is None and flow.steps[1].assertions == () and flow.steps[1].extract == {}
    assert flow.steps[0].assertions[0].operator == "eq"


def test_every_documented_action_is_accepted() -> None:
    actions = {"http_request", "transform", "delay", "database_query", "kafka_produce", "kafka_consume",
               "human_input", "subflow", "sync_records", "python", "redis_get", "redis_set", "grpc_call"}  # fmt: skip
    assert {a.value for a in StepAction} == actions
    # These three have their input checked at publish (tests/unit/test_actions_redis_grpc.py).
    inputs = {"redis_get": {"connector": "c", "key": "k"}, "redis_set": {"connector": "c", "key": "k", "value": 1},
              "grpc_call": {"target": "grpc://h:1", "service": "pkg.S", "method": "M"}}  # fmt: skip
    for action in actions:
        StepDefinition(name="s", action=action, input=inputs.get(action, {}))  # type: ignore[arg-type]


def test_position_and_step_lookup() -> None:
    flow = FlowDefinition.model_validate(flow_dict())
    assert (flow.position("fetch"), flow.position("shape")) == (0, 1)
    assert flow.step("shape").action == "transform"
    with pytest.raises(KeyError):
        flow.step("nope")
    with pytest.raises(KeyError):
        flow.position("nope")


def test_flows_are_immutable() -> None:
    flow = FlowDefinition.model_validate(flow_dict())
    with pytest.raises(ValidationError):
        flow.version = 2  # type: ignore[misc]
    with pytest.raises(ValidationError):
        flow.steps[0].name = "other"  # type: ignore[misc]


def test_json_round_trip() -> None:
    flow = FlowDefinition.model_validate(flow_dict())
    assert FlowDefinition.model_validate_json(flow.model_dump_json()) == flow


# ---------------------------------------------------------------- errors


def test_duplicate_step_names_are_refused_and_named() -> None:
    steps = [{"name": "a", "action": "transform"}, {"name": "b", "action": "delay"},
             {"name": "a", "action": "delay"}, {"name": "b", "action": "transform"}]  # fmt: skip
    [err] = errors_of(flow_dict(steps=steps))
    assert err["loc"] == ("steps",)
    assert "step names must be unique; repeated: a, b" in err["msg"]


def test_unknown_action_is_refused_listing_the_known_ones() -> None:
    [err] = step_errors({"name": "a", "action": "shell"})
    assert err["loc"] == ("steps", 1, "action")
    assert "http_request" in err["msg"] and "python" in err["msg"]


@pytest.mark.parametrize("name", ["", "1st", "has space", "dot.ted", "é", "a" * 65, "-lead", "x/y"])
def test_bad_step_names_are_refused(name: str) -> None:
    [err] = step_errors({"name": name, "action": "transform"})
    assert err["loc"] == ("steps", 1, "name")


@settings(max_examples=100, deadline=None)
@given(name=st.from_regex(r"\A[a-zA-Z][a-zA-Z0-9_\-]{0,63}\Z"))
def test_good_step_names_are_accepted(name: str) -> None:
    assert StepDefinition(name=name, action="transform").name == name  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "loc"),
    [
        ({"steps": []}, ("steps",)),
        ({"id": "has space"}, ("id",)),
        ({"id": ""}, ("id",)),
        ({"id": "x" * 65}, ("id",)),
        ({"version": 0}, ("version",)),
        ({"timeout_s": 0}, ("timeout_s",)),
        ({"concurrency_limit": 0}, ("concurrency_limit",)),
        ({"environment": "STAGING"}, ("environment",)),
        ({"trigger": {"type": "carrier-pigeon"}}, ("trigger", "type")),
        ({"retry_policy": {"delays_s": [1]}}, ("retry_policy",)),  # a typo is an error, not ignored
        ({"retry": {"delays": [1]}}, ("retry", "delays")),
        ({"retry": {"delays_s": ["soon"]}}, ("retry", "delays_s", 0)),
    ],
)
def test_flow_field_errors_point_at_the_field(changes: dict[str, Any], loc: tuple[Any, ...]) -> None:
    assert [e["loc"] for e in errors_of(flow_dict(**changes))] == [loc]


@pytest.mark.parametrize(
    ("step", "loc"),
    [
        ({"timeout_s": -1}, ("timeout_s",)),
        ({"timeout_s": 0}, ("timeout_s",)),
        ({"assertions": [{"expression": "status", "operator": "approx"}]}, ("assertions", 0, "operator")),
        ({"assertions": [{"expected": 200}]}, ("assertions", 0, "expression")),
        ({"extract": {"v": 1}}, ("extract", "v")),
        ({"input": ["not", "an", "object"]}, ("input",)),
        ({"runcondition": "x"}, ("runcondition",)),
        ({"retry": {"retry_conflict_once": "sometimes"}}, ("retry", "retry_conflict_once")),
    ],
)
def test_step_field_errors_point_at_the_step_field(step: dict[str, Any], loc: tuple[Any, ...]) -> None:
    assert [e["loc"] for e in step_errors({"name": "a", "action": "transform", **step})] == [("steps", 1, *loc)]


@pytest.mark.parametrize(
    "retry", [{"delays_s": [1, -5]}, {"max_elapsed_s": -1}], ids=["negative-delay", "negative-max"]
)
def test_a_negative_retry_policy_is_refused(retry: dict[str, Any]) -> None:
    errors_of(flow_dict(retry=retry))
