"""The plan of a local cluster, pure: its KRaft nodes (ids, ports, controller quorum), the replication it allows, and
the service replicas with their ports and instance ids (docs/cluster.md). Nothing here starts a process."""

from __future__ import annotations

import random
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.kafka import min_insync_replicas, replication_factor
from services.common.settings import (
    DEFAULT_API_PORT,
    DEFAULT_EXECUTOR_WEB_PORT,
    DEFAULT_INGEST_PORT,
    DEFAULT_KAFKA_PORT,
    DEFAULT_PROJECTOR_METRICS_PORT,
)

# Start order of the services; each replica answers /healthz and /readyz on its port.
SERVICES = ("ingest", "executor", "projector", "api")
DEFAULT_SERVICE_PORTS: dict[str, int] = {
    "ingest": DEFAULT_INGEST_PORT,
    "executor": DEFAULT_EXECUTOR_WEB_PORT,
    "projector": DEFAULT_PROJECTOR_METRICS_PORT,
    "api": DEFAULT_API_PORT,
}
# The variable that moves each service's port (its own FLOWTRAIL_<SERVICE>_<NAME> setting).
PORT_VARIABLE = {
    "ingest": "FLOWTRAIL_INGEST_PORT",
    "executor": "FLOWTRAIL_EXECUTOR_WEB_PORT",
    "projector": "FLOWTRAIL_PROJECTOR_HTTP_PORT",
    "api": "FLOWTRAIL_API_PORT",
}
# Services that join a consumer group, and so need a stable group.instance.id per replica (static membership).
GROUP_MEMBERS = ("executor", "projector")
# Replica n of a service listens on its port + REPLICA_PORT_STEP * (n - 1): 8702, 8712, 8722 …
REPLICA_PORT_STEP = 10


class ClusterSettings(BaseSettings):
    """How many brokers and replicas `flowtrail up` starts: FLOWTRAIL_BROKERS, FLOWTRAIL_EXECUTORS,
    FLOWTRAIL_PROJECTORS (the flags of the same names win)."""

    model_config = SettingsConfigDict(env_prefix="FLOWTRAIL_", extra="ignore")

    brokers: int = Field(default=1, ge=1, le=9)
    executors: int = Field(default=1, ge=1, le=16)
    projectors: int = Field(default=1, ge=1, le=16)


@dataclass(frozen=True)
class BrokerNode:
    """One KRaft node acting as broker and controller: its id, client port and controller port on loopback."""

    node_id: int
    port: int
    controller_port: int

    @property
    def name(self) -> str:
        return f"kafka-{self.node_id}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def voter(self) -> str:
        return f"{self.node_id}@127.0.0.1:{self.controller_port}"


@dataclass(frozen=True)
class ServiceMember:
    """One process of a service: its name (supervisor, log file), port and group.instance.id (None for HTTP-only)."""

    name: str
    service: str
    port: int
    instance_id: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The variables that make this replica itself, on top of the environment every service gets."""
        own = {PORT_VARIABLE[self.service]: str(self.port)}
        if self.instance_id is not None:
            own[f"FLOWTRAIL_{self.service.upper()}_INSTANCE_ID"] = self.instance_id
        return own


def _member_name(service: str, index: int, count: int) -> str:
    # One replica keeps the service's own name (its log stays executor.log); several are numbered from 1.
    return service if count == 1 else f"{service}-{index}"


@dataclass(frozen=True)
class Layout:
    """The brokers and service replicas of one local cluster."""

    brokers: tuple[BrokerNode, ...]
    members: tuple[ServiceMember, ...]

    @property
    def bootstrap(self) -> str:
        """Every broker, so a client starts whichever of them answers."""
        return ",".join(node.address for node in self.brokers)

    @property
    def quorum_voters(self) -> str:
        """`controller.quorum.voters`: every node votes (3 nodes survive one loss)."""
        return ",".join(node.voter for node in self.brokers)

    @property
    def replication_factor(self) -> int:
        return replication_factor(len(self.brokers))

    @property
    def min_insync_replicas(self) -> int:
        return min_insync_replicas(self.replication_factor)

    def broker(self, node_id: int) -> BrokerNode:
        for node in self.brokers:
            if node.node_id == node_id:
                return node
        raise KeyError(f"no broker with node id {node_id} (have {[n.node_id for n in self.brokers]})")

    def member(self, name: str) -> ServiceMember:
        for member in self.members:
            if member.name == name:
                return member
        raise KeyError(f"no service member named {name!r} (have {[m.name for m in self.members]})")

    def of(self, service: str) -> list[ServiceMember]:
        return [m for m in self.members if m.service == service]

    @classmethod
    def plan(
        cls,
        *,
        brokers: int = 1,
        executors: int = 1,
        projectors: int = 1,
        kafka_port: int = DEFAULT_KAFKA_PORT,
        service_ports: Mapping[str, int] = DEFAULT_SERVICE_PORTS,
    ) -> Layout:
        """Fixed ports: node n on kafka_port + 2(n - 1) with its controller on the next port (19092/19093,
        19094/19095 …); replica n of a service on its port + 10(n - 1)."""
        nodes = tuple(
            BrokerNode(n, kafka_port + 2 * (n - 1), kafka_port + 2 * (n - 1) + 1) for n in range(1, brokers + 1)
        )
        counts = {"ingest": 1, "executor": executors, "projector": projectors, "api": 1}
        members = tuple(
            ServiceMember(
                _member_name(service, n, counts[service]),
                service,
                service_ports[service] + REPLICA_PORT_STEP * (n - 1),
                f"{service}-{n}" if service in GROUP_MEMBERS else None,
            )
            for service in SERVICES
            for n in range(1, counts[service] + 1)
        )
        return cls(nodes, members)

    @classmethod
    def free(cls, *, brokers: int = 3, executors: int = 1, projectors: int = 1) -> Layout:
        """The same shape on free loopback ports (tests: never the shared broker's)."""
        planned = cls.plan(brokers=brokers, executors=executors, projectors=projectors)
        ports = iter(free_ports(2 * brokers + len(planned.members)))
        nodes = tuple(BrokerNode(n.node_id, next(ports), next(ports)) for n in planned.brokers)
        members = tuple(ServiceMember(m.name, m.service, next(ports), m.instance_id) for m in planned.members)
        return cls(nodes, members)

    def to_json(self) -> dict[str, Any]:
        return {"brokers": [asdict(n) for n in self.brokers], "members": [asdict(m) for m in self.members]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Layout:
        return cls(tuple(BrokerNode(**n) for n in data["brokers"]), tuple(ServiceMember(**m) for m in data["members"]))


def free_ports(count: int) -> list[int]:
    """`count` distinct ports nothing listens on now (all held open together, so none is handed out twice), picked
    below the kernel's ephemeral range. A port from that range (what binding port 0 gives) can be taken as the local
    port of some outgoing connection between the pick and the service's own bind, which then fails with "address
    already in use"; below it, only a listener can take it."""
    low = _ephemeral_low()
    sockets: list[socket.socket] = []
    try:
        while len(sockets) < count:
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", random.randint(_PICK_FROM, low - 1) if low - 1 > _PICK_FROM else 0))
            except OSError:  # in use (or lingering in TIME_WAIT): another one
                sock.close()
                continue
            sockets.append(sock)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


# Ports are picked from here up to the ephemeral range: above the fixed ports the launcher uses (Kafka 19092/19093,
# PostgreSQL 15432, the services' 87xx).
_PICK_FROM = 20_000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default
