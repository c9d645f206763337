"""The chaos stack on a local cluster (docs/cluster.md): several KRaft brokers and several executor and projector
replicas from the launcher's own `LocalCluster`, on the run's private PostgreSQL; one broker at a time is killed."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from deploy.launcher.cluster import LocalCluster
from deploy.launcher.kafka import ensure_kafka_jars, kafka_jar_dir
from deploy.launcher.layout import Layout
from tests.chaos.stack import ChaosStack, PrivatePostgres, Topology, sandbox_key
from tests.conftest import STATE_DIR, Infra, make_sandbox
from tests.e2e.stack import Stack


class ClusterBrokers:
    """The cluster's nodes as the faults see them."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster

    @property
    def bootstrap(self) -> str:
        return self.cluster.bootstrap

    def nodes(self) -> list[int]:
        return [node.node_id for node in self.cluster.layout.brokers]

    def kill(self, node: int) -> None:
        self.cluster.kill_broker(node)

    def start_node(self, node: int) -> None:
        self.cluster.kafka.start_node(node, 120.0)


def _link(logs: Path, target: Path) -> None:
    """`logs` (an empty folder) made a link to where the cluster writes its logs."""
    logs.rmdir()
    logs.symlink_to(target, target_is_directory=True)


@asynccontextmanager
async def cluster_stack(topology: Topology, state: Path, logs: Path, **extra_env: str) -> AsyncIterator[ChaosStack]:
    """`topology.brokers` nodes and the replicas, started by `LocalCluster` in `state` (logs in `state`/logs, linked
    from `logs`), a sandbox on them and the private PostgreSQL; everything stopped on exit."""
    postgres = PrivatePostgres(state / "pg")
    layout = Layout.free(brokers=topology.brokers, executors=topology.executors, projectors=topology.projectors)
    home = state / "cluster"
    (home / "cache").mkdir(parents=True)
    os.symlink(ensure_kafka_jars(STATE_DIR), kafka_jar_dir(home))  # the shared jars, not a second download
    cluster = LocalCluster(home, layout)
    try:
        await asyncio.gather(asyncio.to_thread(postgres.start), cluster.start_brokers())
        await asyncio.to_thread(_link, logs, home / "logs")
        infra = Infra(cluster.bootstrap, postgres.dsn, STATE_DIR)
        async with make_sandbox(infra, topology.partitions) as sandbox:
            key = await sandbox_key(sandbox)
            env = {**os.environ, **Stack.build(sandbox, (), home / "logs", **extra_env).env}
            await cluster.start_services(env, within=240)
            try:
                yield ChaosStack(sandbox, key, cluster.supervisor, postgres, ClusterBrokers(cluster), topology,
                                 {m.name: m.service for m in layout.members},
                                 {m.name: m.url for m in layout.members})  # fmt: skip
            finally:
                await cluster.replicas.stop()  # before the sandbox's schema goes
    finally:
        await cluster.stop()
        await asyncio.to_thread(postgres.stop)
