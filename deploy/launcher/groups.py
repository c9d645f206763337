"""A consumer group's members and the partitions each holds, as `flowtrail status` shows them (docs/cluster.md)."""

from __future__ import annotations

from typing import Any

from aiokafka.client import AIOKafkaClient, CoordinationType
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import Array, Boolean, Bytes, Int16, Int32, Schema, String


class _DescribeGroupsResponseV4(Response):
    """DescribeGroups v4 (KIP-345): each member's group.instance.id, which aiokafka 0.14 has no schema for."""

    API_KEY = 15
    API_VERSION = 4
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("groups", Array(
            ("error_code", Int16), ("group", String("utf-8")), ("state", String("utf-8")),
            ("protocol_type", String("utf-8")), ("protocol", String("utf-8")),
            ("members", Array(
                ("member_id", String("utf-8")), ("group_instance_id", String("utf-8")),
                ("client_id", String("utf-8")), ("client_host", String("utf-8")),
                ("member_metadata", Bytes), ("member_assignment", Bytes),
            )),
            ("authorized_operations", Int32),
        )),
    )  # fmt: skip


class _DescribeGroupsRequestV4(RequestStruct):
    API_KEY = 15
    API_VERSION = 4
    RESPONSE_TYPE = _DescribeGroupsResponseV4
    SCHEMA = Schema(("groups", Array(String("utf-8"))), ("include_authorized_operations", Boolean))


class _DescribeGroups(Request[_DescribeGroupsRequestV4]):
    """DescribeGroups at version 4 (brokers from Kafka 2.4). aiokafka's own stops at version 3, and decodes that
    answer with the version 2 schema, which fails against Kafka 3.x."""

    API_KEY = 15

    def __init__(self, groups: list[str]) -> None:
        self._groups = groups

    def build(self, request_struct_class: type[_DescribeGroupsRequestV4]) -> _DescribeGroupsRequestV4:
        return request_struct_class(self._groups, False)


async def describe_group(bootstrap: str, group: str, topic: str) -> dict[str, Any]:
    """The group's state and, per member, its instance id, client and the partitions of `topic` it is assigned."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap, client_id="flowtrail-status", request_timeout_ms=5000)
    await client.bootstrap()
    try:
        node = await client.coordinator_lookup(CoordinationType.GROUP, group)
        answer = (await client.send(node, _DescribeGroups([group]))).to_object()
    finally:
        await client.close()
    described = answer["groups"][0]
    members = []
    for m in described["members"]:
        partitions: list[int] = []
        if m["member_assignment"]:
            assigned = ConsumerProtocolMemberAssignment.decode(m["member_assignment"])
            partitions = sorted(p for name, parts in assigned.assignment for p in parts if name == topic)
        members.append({
            "member_id": m["member_id"], "instance_id": m["group_instance_id"], "client_id": m["client_id"],
            "host": m["client_host"], "partitions": partitions,
        })  # fmt: skip
    members.sort(key=lambda member: member["instance_id"] or member["member_id"])
    return {"state": described["state"], "members": members}
