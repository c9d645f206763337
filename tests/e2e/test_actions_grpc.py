"""grpc_call steps against real gRPC servers the test runs in-process (grpcio, aio): one with server reflection, one
without (its types given as a descriptor set). The service is described by a descriptor built here with
descriptor_pb2, so nothing is compiled or fetched. Covers OK, each mapped status, deadlines, metadata, unknown
services and methods (at publish and at run time), and the guard."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import orjson
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from schemas.flows import FlowDefinition
from services.executor.adapters.actions_grpc import classify_grpc
from services.executor.adapters.steps import StepOutcome, StepRunners
from tests.conftest import Infra
from tests.e2e.stack import free_port
from tests.harness import running, steps_of
from tests.integration.test_step_actions import failed, run

SERVICE = "shop.v1.Orders"
F = descriptor_pb2.FieldDescriptorProto


def orders_file() -> descriptor_pb2.FileDescriptorProto:
    """shop/v1/orders.proto: Get(GetOrderRequest) → Order, and a server-streaming Watch."""
    proto = descriptor_pb2.FileDescriptorProto(name="shop/v1/orders.proto", package="shop.v1", syntax="proto3")
    request = proto.message_type.add(name="GetOrderRequest")
    request.field.add(name="order_id", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    request.field.add(name="delay_ms", number=2, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL)
    request.field.add(name="fail_with", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    order = proto.message_type.add(name="Order")
    order.field.add(name="order_id", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    order.field.add(name="qty", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    order.field.add(name="tags", number=3, type=F.TYPE_STRING, label=F.LABEL_REPEATED)
    order.field.add(name="paid", number=4, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL)
    service = proto.service.add(name="Orders")
    service.method.add(name="Get", input_type=".shop.v1.GetOrderRequest", output_type=".shop.v1.Order")
    service.method.add(name="Watch", input_type=".shop.v1.GetOrderRequest", output_type=".shop.v1.Order",
                       server_streaming=True)  # fmt: skip
    return proto


def descriptor_set() -> str:
    return base64.b64encode(descriptor_pb2.FileDescriptorSet(file=[orders_file()]).SerializeToString()).decode()


@dataclass(frozen=True)
class Servers:
    reflecting: int  # port of the server with reflection
    plain: int  # port of the one without


@pytest.fixture(scope="module")
async def servers() -> AsyncIterator[Servers]:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(orders_file())
    request_class = message_factory.GetMessageClass(pool.FindMessageTypeByName("shop.v1.GetOrderRequest"))
    order_class = message_factory.GetMessageClass(pool.FindMessageTypeByName("shop.v1.Order"))

    async def get(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request.delay_ms:
            await asyncio.sleep(request.delay_ms / 1000)
        if request.fail_with:
            await context.abort(getattr(grpc.StatusCode, request.fail_with), f"told to fail with {request.fail_with}")
        metadata = dict(context.invocation_metadata() or ())
        await context.send_initial_metadata((("x-served-by", "orders-test"),))
        tags = [f"{k}={metadata[k]}" for k in ("x-tenant", "idempotency-key") if k in metadata]
        return order_class(order_id=request.order_id, qty=3, tags=tags)

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Get": grpc.unary_unary_rpc_method_handler(get, request_deserializer=request_class.FromString,
                                                   response_serializer=order_class.SerializeToString),
    })  # fmt: skip
    started = []
    ports = []
    for with_reflection in (True, False):
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        if with_reflection:
            reflection.enable_server_reflection((SERVICE, reflection.SERVICE_NAME), server, pool=pool)
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        started.append(server)
    try:
        yield Servers(reflecting=ports[0], plain=ports[1])
    finally:
        for server in started:
            await server.stop(grace=None)


@pytest.fixture
async def runners(servers: Servers) -> AsyncIterator[StepRunners]:
    connectors = {"orders": f"grpc://127.0.0.1:{servers.reflecting}", "plain": f"grpc://127.0.0.1:{servers.plain}",
                  "gone": f"grpc://127.0.0.1:{free_port()}"}  # fmt: skip
    r = StepRunners(allow_private_networks=False, time_scale=1.0, max_body_bytes=4096, connectors=connectors)
    yield r
    await r.close()


async def call(runners: StepRunners, spec: dict[str, Any], timeout_s: float = 20) -> StepOutcome:
    return await run(runners, "grpc_call", spec, timeout_s=timeout_s)


def get(request: dict[str, Any], connector: str = "orders", **extra: Any) -> dict[str, Any]:
    return {"connector": connector, "service": SERVICE, "method": "Get", "request": request, **extra}


async def test_a_call_with_types_from_reflection(runners: StepRunners) -> None:
    outcome = await call(runners, get({"order_id": "SO-1"}, metadata={"x-tenant": "acme"}))
    assert outcome.ok, outcome
    out = outcome.output
    assert (out["service"], out["method"], out["status"]) == (SERVICE, "Get", "OK")
    assert out["request"] == {"order_id": "SO-1"}
    # The response as JSON with the .proto's field names; zero values shown; int64 as a string (protobuf's mapping).
    assert out["response"] == {"order_id": "SO-1", "qty": "3", "paid": False,
                               "tags": ["x-tenant=acme", "idempotency-key=run-1:s:1"]}  # fmt: skip
    assert out["response_metadata"]["x-served-by"] == "orders-test"


async def test_a_call_with_types_from_a_descriptor_set(runners: StepRunners) -> None:
    without = await call(runners, get({"order_id": "SO-2"}, connector="plain"))
    assert failed(without)[:2] == ("VALIDATION", "no_reflection") and "descriptor_set" in failed(without)[2]
    outcome = await call(runners, get({"order_id": "SO-2"}, connector="plain", descriptor_set=descriptor_set()))
    assert outcome.ok and outcome.output["response"]["order_id"] == "SO-2"


@pytest.mark.parametrize(("status", "category"), [
    ("UNAVAILABLE", "TRANSIENT"), ("RESOURCE_EXHAUSTED", "TRANSIENT"), ("INTERNAL", "TRANSIENT"),
    ("INVALID_ARGUMENT", "VALIDATION"), ("NOT_FOUND", "VALIDATION"), ("FAILED_PRECONDITION", "VALIDATION"),
    ("UNAUTHENTICATED", "AUTH"), ("PERMISSION_DENIED", "AUTH"), ("ABORTED", "CONFLICT"), ("ALREADY_EXISTS", "CONFLICT"),
])  # fmt: skip
async def test_each_status_is_classified(runners: StepRunners, status: str, category: str) -> None:
    outcome = await call(runners, get({"order_id": "SO-3", "fail_with": status}))
    got_category, code, message = failed(outcome)
    assert (got_category, code) == (category, status)
    assert f"told to fail with {status}" in message
    assert outcome.output["status"] == status and outcome.output["request"]["fail_with"] == status


def test_every_status_code_has_a_category() -> None:
    for code in grpc.StatusCode:
        if code is not grpc.StatusCode.OK:
            assert classify_grpc(code).value in ("TRANSIENT", "AUTH", "CONFLICT", "VALIDATION")
    assert classify_grpc(grpc.StatusCode.DEADLINE_EXCEEDED).value == "TRANSIENT"
    assert classify_grpc(grpc.StatusCode.UNIMPLEMENTED).value == "VALIDATION"


async def test_a_deadline_is_transient(runners: StepRunners) -> None:
    outcome = await call(runners, get({"order_id": "SO-4", "delay_ms": 2000}, deadline_s=0.3))
    assert failed(outcome)[:2] == ("TRANSIENT", "DEADLINE_EXCEEDED")
    # The step's timeout caps the deadline, so the call ends before the step is cut off.
    capped = await call(runners, get({"order_id": "SO-4", "delay_ms": 3000}), timeout_s=0.5)
    assert failed(capped)[:2] == ("TRANSIENT", "DEADLINE_EXCEEDED")


async def test_unknown_services_methods_and_bad_requests(runners: StepRunners) -> None:
    category, code, message = failed(await call(runners, {**get({}), "service": "shop.v1.Nope"}))
    assert (category, code) == ("VALIDATION", "unknown_service") and "shop.v1.Nope" in message
    category, code, message = failed(await call(runners, {**get({}), "method": "Delete"}))
    assert (category, code) == ("VALIDATION", "unknown_method") and "Get, Watch" in message
    assert failed(await call(runners, {**get({}), "method": "Watch"}))[:2] == ("VALIDATION", "streaming_method")
    category, code, message = failed(await call(runners, get({"order_id": "SO-5", "colour": "red"})))
    assert (category, code) == ("VALIDATION", "invalid_request") and "colour" in message
    # With a descriptor set the same mistakes are refused at publish.
    step = {"name": "s", "action": "grpc_call", "input": {**get({}), "method": "Delete",
                                                          "descriptor_set": descriptor_set()}}  # fmt: skip
    with pytest.raises(ValidationError, match=r"no method 'Delete' \(it has: Get, Watch\)"):
        FlowDefinition.model_validate({"id": "f", "tenant_id": "t", "name": "F", "version": 1, "steps": [step]})


async def test_an_unreachable_server_is_transient(runners: StepRunners) -> None:
    category, code, message = failed(await call(runners, get({}, connector="gone"), timeout_s=5))
    assert (category, code) == ("TRANSIENT", "UNAVAILABLE"), message


async def test_a_target_in_a_flow_may_not_reach_private_networks(runners: StepRunners, servers: Servers) -> None:
    # A target written in the step is not the operator's connector: guarded, loopback included, before dialling.
    for target in (f"grpc://127.0.0.1:{servers.reflecting}", "grpc://10.1.2.3:50051", "grpcs://[::1]:443"):
        outcome = await call(runners, {**get({}), "connector": None, "target": target})
        category, code, message = failed(outcome)
        assert (category, code) == ("VALIDATION", "blocked_address") and "private or reserved" in message, target


async def test_a_run_calls_grpc_and_a_retryable_status_is_retried(
    infra: Infra, tmp_path_factory: pytest.TempPathFactory, servers: Servers
) -> None:
    """On real processes: a grpc_call's response extracted into a variable; UNAVAILABLE retried, then the run fails
    with the status as the error's code; an unknown method in a descriptor set is refused at publish (422)."""
    connectors = orjson.dumps({"orders": f"grpc://127.0.0.1:{servers.reflecting}"}).decode()
    extra = {"FLOWTRAIL_EXECUTOR_CONNECTORS": connectors, "FLOWTRAIL_EXECUTOR_TIME_SCALE": "0.01"}
    async with running(infra, tmp_path_factory, env=extra) as env:
        call = {"connector": "orders", "service": SERVICE, "method": "Get", "deadline_s": 5,
                "request": {"order_id": "{{ trigger.order_id }}", "fail_with": "{{ trigger.fail }}"}}  # fmt: skip
        flow = {"id": "grpc-order", "name": "Order over gRPC", "steps": [
            {"name": "get", "action": "grpc_call", "input": call, "extract": {"qty": "response.qty"},
             "retry": {"delays_s": [0.1]}},
            {"name": "show", "action": "transform", "input": {"output": {"qty": "{{ vars.qty }}"}}},
        ]}  # fmt: skip
        await env.create_flow(flow)
        bad = {**call, "method": "Delete", "descriptor_set": descriptor_set()}
        refused = await env.api("POST", "/v1/flows", json={**flow, "id": "grpc-bad", "steps": [
            {"name": "get", "action": "grpc_call", "input": bad}]})  # fmt: skip
        assert refused.status_code == 422 and "no method 'Delete'" in refused.json()["error"]["message"], refused.text

        ok = await env.wait_status(await env.trigger("grpc-order", {"order_id": "SO-21", "fail": ""}), within=90)
        assert ok["status"] == "SUCCEEDED", ok
        get_step = steps_of(ok)["get"]
        assert get_step["output"]["response"]["order_id"] == "SO-21" and get_step["output"]["status"] == "OK"
        assert steps_of(ok)["show"]["output"] == {"qty": "3"}

        failing = await env.trigger("grpc-order", {"order_id": "SO-22", "fail": "UNAVAILABLE"})
        failed_run = await env.wait_status(failing, within=90)
        assert failed_run["status"] == "FAILED", failed_run
        attempts = steps_of(failed_run)["get"]["attempts"]
        assert [a["error"]["code"] for a in attempts] == ["UNAVAILABLE", "UNAVAILABLE"]
        assert {a["error"]["category"] for a in attempts} == {"TRANSIENT"}
