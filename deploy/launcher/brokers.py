"""A KRaft Kafka cluster of several nodes on loopback (docs/cluster.md): each node broker and controller, with its own
ports, node id and folder under <state_dir>/kafka/node-<id>; start, stop, kill -9 and restart one node."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.launcher.errors import LauncherError
from deploy.launcher.kafka import (
    CMDLINE_MARKER,
    JVM_OPTS,
    LOG4J_PROPERTIES,
    ensure_kafka_jars,
    format_storage,
    new_cluster_id,
    require_java,
    server_properties,
)
from deploy.launcher.kafka_wire import broker_ids, run_sync
from deploy.launcher.layout import BrokerNode, Layout
from deploy.launcher.procs import (
    live_pid_from_file,
    open_log,
    port_accepts,
    port_is_free,
    remove_file,
    terminate,
    wait_gone,
    with_log_tail,
    write_pid,
)

log = logging.getLogger("flowtrail.launcher")


@dataclass(frozen=True)
class NodePaths:
    """Where one node keeps its files."""

    dir: Path
    log: Path

    @property
    def data(self) -> Path:
        return self.dir / "data"

    @property
    def config(self) -> Path:
        return self.dir / "server.properties"

    @property
    def log4j(self) -> Path:
        return self.dir / "log4j.properties"

    @property
    def pid(self) -> Path:
        return self.dir / "kafka.pid"

    @property
    def quorum_state(self) -> Path:
        return self.data / "__cluster_metadata-0" / "quorum-state"


def node_paths(state_dir: Path, node: BrokerNode) -> NodePaths:
    state_dir = Path(state_dir).resolve()
    return NodePaths(state_dir / "kafka" / f"node-{node.node_id}", state_dir / "logs" / f"kafka-{node.node_id}.log")


def node_pid(state_dir: Path, node: BrokerNode) -> int | None:
    """The pid of the node's process when it runs."""
    return live_pid_from_file(node_paths(state_dir, node).pid, CMDLINE_MARKER)


def quorum_leader(state_dir: Path, layout: Layout) -> int | None:
    """The controller quorum's leader (the active controller) as the running nodes last recorded it in their
    quorum-state files: the newest epoch's leader; None when no running node knows one."""
    best: tuple[int, int] | None = None
    for node in layout.brokers:
        if node_pid(state_dir, node) is None:
            continue
        try:
            state = json.loads(node_paths(state_dir, node).quorum_state.read_text())
        except (OSError, ValueError):
            continue
        leader, epoch = int(state.get("leaderId", -1)), int(state.get("leaderEpoch", -1))
        if leader >= 0 and (best is None or epoch > best[1]):
            best = (leader, epoch)
    return best[0] if best else None


class KafkaCluster:
    """The KRaft nodes of `layout` in `state_dir`. Nodes another launcher started are reused, never stopped."""

    def __init__(self, state_dir: Path, layout: Layout) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.layout = layout
        self._started: dict[int, subprocess.Popen[bytes]] = {}
        self._java = ""
        self._jars = Path()

    @property
    def bootstrap(self) -> str:
        return self.layout.bootstrap

    def paths(self, node_id: int) -> NodePaths:
        return node_paths(self.state_dir, self.layout.broker(node_id))

    def pid(self, node_id: int) -> int | None:
        return node_pid(self.state_dir, self.layout.broker(node_id))

    def _cluster_id(self) -> str:
        """The cluster's id: kept in <state_dir>/kafka/cluster-id, made once; every node is formatted with it."""
        path = self.state_dir / "kafka" / "cluster-id"
        if path.exists():
            return path.read_text().strip()
        path.parent.mkdir(parents=True, exist_ok=True)
        cluster_id = new_cluster_id()
        path.write_text(cluster_id + "\n")
        return cluster_id

    def _prepare(self, node: BrokerNode) -> None:
        paths = node_paths(self.state_dir, node)
        paths.data.mkdir(parents=True, exist_ok=True)
        paths.config.write_text(
            server_properties(
                paths.data, node.port, node.controller_port, node_id=node.node_id, voters=self.layout.quorum_voters,
                replication=self.layout.replication_factor, min_insync=self.layout.min_insync_replicas,
            )
        )  # fmt: skip
        paths.log4j.write_text(LOG4J_PROPERTIES)

    def _spawn(self, node: BrokerNode) -> None:
        paths = node_paths(self.state_dir, node)
        for needed in (node.port, node.controller_port):
            if not port_is_free(needed) or port_accepts(needed, timeout=0.3):
                raise LauncherError(f"port {needed} of Kafka node {node.node_id} is in use by another program")
        argv = [
            self._java, *JVM_OPTS, f"-Dlog4j.configuration=file:{paths.log4j}",
            "-cp", f"{self._jars}/*", "kafka.Kafka", str(paths.config),
        ]  # fmt: skip
        log_fd = open_log(paths.log)
        try:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=subprocess.STDOUT,
                                       cwd=paths.dir, start_new_session=True)  # fmt: skip
        finally:
            os.close(log_fd)
        write_pid(paths.pid, process.pid)
        self._started[node.node_id] = process
        log.info("started Kafka node %d (pid %d) on %s", node.node_id, process.pid, node.address)

    def _wait_listed(self, nodes: list[BrokerNode], timeout: float) -> None:
        """Until each node answers on its own port with a Metadata listing every node in `nodes`."""
        wanted = {n.node_id for n in nodes}
        deadline = time.monotonic() + timeout
        pending = list(nodes)
        while pending:
            for node in list(pending):
                process = self._started.get(node.node_id)
                if process is not None and process.poll() is not None:
                    raise LauncherError(with_log_tail(
                        f"Kafka node {node.node_id} exited during start-up (exit code {process.returncode})",
                        node_paths(self.state_dir, node).log))  # fmt: skip
                listed = broker_ids(node.address)
                if listed is not None and wanted <= listed:
                    pending.remove(node)
            if not pending:
                return
            if time.monotonic() >= deadline:
                node = pending[0]
                raise LauncherError(with_log_tail(
                    f"Kafka node {node.node_id} did not list nodes {sorted(wanted)} within {timeout:.0f} s",
                    node_paths(self.state_dir, node).log))  # fmt: skip
            time.sleep(0.3)

    def start(self, timeout: float = 120.0) -> None:
        """Format (first time) and start every node not running, then wait until each lists all of them."""
        self._java = require_java()
        self._jars = ensure_kafka_jars(self.state_dir)
        cluster_id = self._cluster_id()
        todo = [node for node in self.layout.brokers if self.pid(node.node_id) is None]
        for node in todo:
            self._prepare(node)
        # Formatting starts a JVM per node: side by side.
        formats = [
            asyncio.to_thread(format_storage, self._java, self._jars, p.config, p.log4j, p.data, cluster_id)
            for p in (node_paths(self.state_dir, node) for node in todo)
        ]
        run_sync(_gather(formats))
        try:
            for node in todo:
                self._spawn(node)
            self._wait_listed(list(self.layout.brokers), timeout)
        except BaseException:
            self.stop(timeout=10.0)
            raise

    def kill(self, node_id: int) -> None:
        """SIGKILL one node, as a crash: no shutdown, no leadership handed over."""
        pid = self.pid(node_id)
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 10.0)
        self._reap(node_id)
        log.info("killed Kafka node %d (pid %d)", node_id, pid)

    def stop_node(self, node_id: int, timeout: float = 30.0) -> None:
        """SIGTERM one node (a controlled shutdown), SIGKILL after `timeout` s."""
        pid = self.pid(node_id)
        if pid is not None:
            terminate(pid, timeout)
        self._reap(node_id)
        remove_file(self.paths(node_id).pid)

    def start_node(self, node_id: int, timeout: float = 120.0) -> None:
        """Start one stopped node again with its configuration and data; returns when it lists itself."""
        node = self.layout.broker(node_id)
        if self.pid(node_id) is not None:
            return
        if not self._java:
            self._java, self._jars = require_java(), ensure_kafka_jars(self.state_dir)
        self._prepare(node)
        self._spawn(node)
        self._wait_listed([node], timeout)

    def _reap(self, node_id: int) -> None:
        process = self._started.pop(node_id, None)
        if process is not None:
            process.wait(timeout=10)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the nodes this object started (all at once: a quorum stops together)."""
        pids = {node_id: p.pid for node_id, p in self._started.items() if p.poll() is None}
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for node_id, pid in pids.items():
            if not wait_gone(pid, timeout):
                log.warning("Kafka node %d did not stop within %.0f s and was killed", node_id, timeout)
                terminate(pid, 1.0)
        for node_id in list(self._started):
            self._reap(node_id)
            remove_file(self.paths(node_id).pid)


async def _gather(jobs: list[Coroutine[Any, Any, None]]) -> None:
    await asyncio.gather(*jobs)


def stop_cluster_nodes(state_dir: Path, timeout: float = 30.0) -> list[int]:
    """Stop every node recorded under <state_dir>/kafka/node-*/ (`flowtrail down`), all at once as a quorum stops
    best; the ids stopped."""
    running = {}
    for pid_file in sorted(Path(state_dir).resolve().glob("kafka/node-*/kafka.pid")):
        pid = live_pid_from_file(pid_file, CMDLINE_MARKER)
        if pid is not None:
            running[int(pid_file.parent.name.removeprefix("node-"))] = pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        remove_file(pid_file)
    for pid in running.values():
        if not wait_gone(pid, timeout):
            terminate(pid, 1.0)
    return sorted(running)
