"""redis_get, redis_set and grpc_call without servers: their inputs checked at publish, the guard's decision on a
redis connection (made before anything is dialled) and the classification of failures (docs/flows.md)."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from pydantic import ValidationError
from redis import exceptions as rerr

from schemas.flows import FlowDefinition, StepDefinition
from services.common.netguard import BlockedAddress
from services.executor.adapters.actions_redis import GuardedConnection, GuardedSSLConnection, classify_redis


def publish(action: str, step_input: dict[str, Any]) -> FlowDefinition:
    return FlowDefinition.model_validate({"id": "f", "tenant_id": "t", "name": "F", "version": 1,
                                          "steps": [{"name": "s", "action": action, "input": step_input}]})  # fmt: skip


def refusal(action: str, step_input: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        publish(action, step_input)
    return str(caught.value)


def test_redis_inputs_are_checked_at_publish_naming_each_bad_field() -> None:
    assert publish("redis_get", {"connector": "cache", "key": "user:{{ trigger.id }}"})
    assert publish("redis_set", {"connector": "cache", "key": "k", "value": {"a": 1}, "ttl_s": 30, "condition": "nx"})
    message = refusal("redis_set", {"connector": "cache", "key": "", "value": 1, "ttl_s": -1, "condition": "maybe",
                                    "expire": 5})  # fmt: skip
    assert "redis_set input:" in message
    for field in ("key:", "ttl_s:", "condition:", "expire: Extra inputs are not permitted"):
        assert field in message, field
    assert "value: Field required" in refusal("redis_set", {"connector": "cache", "key": "k"})
    assert "connector: Field required" in refusal("redis_get", {"key": "k"})


def test_a_template_is_checked_when_it_is_rendered_not_at_publish() -> None:
    # ttl_s must be a number: a template that renders one is accepted now and checked at run time.
    assert publish("redis_set", {"connector": "cache", "key": "k", "value": "{{ trigger.v }}",
                                 "ttl_s": "{{ trigger.ttl }}"})  # fmt: skip
    assert "ttl_s:" in refusal("redis_set", {"connector": "cache", "key": "k", "value": 1, "ttl_s": "soon"})


def test_grpc_inputs_are_checked_at_publish() -> None:
    assert publish("grpc_call", {"target": "grpc://api.example:443", "service": "shop.v1.Orders", "method": "Get",
                                 "request": {"id": "{{ trigger.id }}"}, "metadata": {"x-tenant": "a"},
                                 "deadline_s": 5})  # fmt: skip
    assert "exactly one of `connector`" in refusal("grpc_call", {"service": "a.B", "method": "M"})
    assert "exactly one of `connector`" in refusal("grpc_call", {"connector": "c", "target": "grpc://h:1",
                                                                 "service": "a.B", "method": "M"})  # fmt: skip
    message = refusal("grpc_call", {"target": "http://h:1", "service": "a..B", "method": "Get/All",
                                    "deadline_s": 0})  # fmt: skip
    for field in ("target:", "service:", "method:", "deadline_s:"):
        assert field in message, field
    assert "lower case" in refusal("grpc_call", {"target": "grpc://h:1", "service": "a.B", "method": "M",
                                                 "metadata": {"X-Tenant": "a"}})  # fmt: skip


def test_a_stored_version_is_not_checked_again() -> None:
    from schemas.flows import STORED_FLOW

    step = StepDefinition.model_validate({"name": "s", "action": "redis_get", "input": {"key": "k"}},
                                         context=STORED_FLOW)  # fmt: skip
    assert step.input == {"key": "k"}  # the runner refuses it when the run reaches it


@pytest.mark.parametrize("ssl", [False, True])
async def test_the_guard_refuses_a_private_address_before_dialling(ssl: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    dialled: list[Any] = []

    async def no_dial(*args: Any, **kwargs: Any) -> Any:
        dialled.append((args, kwargs))
        raise AssertionError("dialled")

    monkeypatch.setattr("asyncio.open_connection", no_dial)
    monkeypatch.setattr(socket, "create_connection", no_dial)
    cls = GuardedSSLConnection if ssl else GuardedConnection
    for host in ("10.1.2.3", "192.168.0.10", "169.254.169.254", "127.0.0.1", "::1"):
        connection = cls(host=host, port=6379, socket_connect_timeout=2)
        with pytest.raises(BlockedAddress, match="private or reserved"):
            await connection._connect()
        assert dialled == [], host


def test_redis_failures_are_classified() -> None:
    blocked = rerr.ConnectionError("Error connecting")
    blocked.__cause__ = BlockedAddress("10.0.0.1 resolves to 10.0.0.1, a private or reserved address")
    cases = [
        (blocked, ("VALIDATION", "blocked_address")),
        (rerr.AuthenticationError("invalid username-password pair"), ("AUTH", "auth")),
        (rerr.ResponseError("NOAUTH Authentication required."), ("AUTH", "auth")),
        (rerr.ResponseError("Command # 1 (GET k) of pipeline caused error: WRONGTYPE Operation against a key"),
         ("VALIDATION", "wrong_type")),
        (rerr.BusyLoadingError("LOADING"), ("TRANSIENT", "busy")),
        (rerr.ConnectionError("Connection refused"), ("TRANSIENT", "network")),
        (rerr.TimeoutError("Timeout reading"), ("TRANSIENT", "network")),
        (rerr.ReadOnlyError("READONLY You can't write against a read only replica."), ("TRANSIENT", "read_only")),
        (rerr.ResponseError("ERR value is not an integer"), ("VALIDATION", "redis_error")),
    ]  # fmt: skip
    for exc, expected in cases:
        got = classify_redis(exc)
        assert got is not None and (got[0].value, got[1]) == expected, exc
    assert classify_redis(KeyError("bug")) is None  # an executor bug stays INTERNAL


def test_a_descriptor_set_is_read_at_publish() -> None:
    step = {"target": "grpc://h:1", "service": "shop.v1.Orders", "method": "Get"}
    assert "descriptor_set: not a base64 FileDescriptorSet" in refusal("grpc_call", {**step, "descriptor_set": "%%"})
    empty = "CgA="  # one empty file: no service
    assert "no service 'shop.v1.Orders' (it has: none)" in refusal("grpc_call", {**step, "descriptor_set": empty})
    # A templated set is read when the step runs.
    assert publish("grpc_call", {**step, "descriptor_set": "{{ vars.descriptors }}"})
