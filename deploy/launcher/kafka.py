"""Fetch, configure, start, reuse and stop a single-node KRaft Apache Kafka broker for local runs."""

from __future__ import annotations

import base64
import logging
import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from deploy.launcher.errors import LauncherError
from deploy.launcher.kafka_wire import kafka_answers
from deploy.launcher.procs import (
    file_lock,
    live_pid_from_file,
    open_log,
    port_accepts,
    port_is_free,
    remove_file,
    terminate,
    with_log_tail,
    write_pid,
)

log = logging.getLogger("flowtrail.launcher")

KAFKA_VERSION = "3.9.1"
POM_PATH = Path(__file__).resolve().parents[1] / "kafka" / "pom.xml"
# Marks a jar folder that Maven filled completely (a half-finished download has no marker).
_COMPLETE_MARKER = ".complete"
_MAIN_JAR = f"kafka_2.13-{KAFKA_VERSION}.jar"
CMDLINE_MARKER = "kafka.Kafka"
JVM_OPTS = [
    "-Xms256m",
    "-Xmx768m",
    "-XX:+UseG1GC",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
]

# Console only: the process output goes to <state_dir>/logs/kafka.log. Kafka internals at WARN keep it small,
# but the start/stop lines of the server itself stay visible.
LOG4J_PROPERTIES = """\
log4j.rootLogger=WARN, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka=WARN
log4j.logger.org.apache.kafka=WARN
log4j.logger.kafka.server.KafkaRaftServer=INFO
log4j.logger.kafka.server.BrokerServer=INFO
log4j.logger.kafka.server.ControllerServer=INFO
log4j.logger.kafka.Kafka$=INFO
log4j.logger.state.change.logger=WARN
log4j.logger.kafka.request.logger=WARN
log4j.logger.kafka.authorizer.logger=WARN
"""


@dataclass
class KafkaHandle:
    """A broker the launcher ensured; ``stop()`` only stops it when this process started it."""

    bootstrap: str
    started_by_us: bool
    pid: int | None
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)
    _pid_file: Path | None = field(default=None, repr=False, compare=False)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the broker, wait up to ``timeout`` s, then SIGKILL. A no-op for a reused broker."""
        if not self.started_by_us or self.pid is None:
            return
        log.info("stopping Kafka (pid %d)", self.pid)
        if not terminate(self.pid, timeout):
            log.warning("Kafka did not stop within %.0f s and was killed", timeout)
        if self._process is not None:
            self._process.wait()
        if self._pid_file is not None and live_pid_from_file(self._pid_file, CMDLINE_MARKER) is None:
            remove_file(self._pid_file)
        self.started_by_us = False
        self.pid = None


def _java_major_version(java: str) -> int | None:
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not match:
        return None
    major = int(match.group(1))
    # Java 8 and older report "1.8.0_…".
    return int(match.group(2) or 0) if major == 1 else major


def require_java() -> str:
    """Path of a Java 17+ ``java`` binary, or a LauncherError that says how to install one."""
    java = shutil.which("java")
    if java is None:
        raise LauncherError("Java 17+ is required to run Kafka: apt-get install openjdk-17-jre-headless")
    major = _java_major_version(java)
    if major is not None and major < 17:
        raise LauncherError(
            f"Java 17+ is required to run Kafka, found Java {major} at {java}: apt-get install openjdk-17-jre-headless"
        )
    return java


def kafka_jar_dir(state_dir: Path) -> Path:
    return Path(state_dir).resolve() / "cache" / f"kafka-{KAFKA_VERSION}"


def ensure_kafka_jars(state_dir: Path) -> Path:
    """The folder of Kafka's jars, downloading them once with Maven into ``<state_dir>/cache``."""
    jar_dir = kafka_jar_dir(state_dir)
    if (jar_dir / _COMPLETE_MARKER).exists() and (jar_dir / _MAIN_JAR).exists():
        return jar_dir
    require_java()
    mvn = shutil.which("mvn")
    if mvn is None:
        raise LauncherError("Maven is required to download Kafka's jars: apt-get install maven")
    if not POM_PATH.exists():
        raise LauncherError(f"{POM_PATH} is missing; it lists the Kafka jars to download")
    jar_dir.mkdir(parents=True, exist_ok=True)
    log.info("downloading Kafka %s jars with Maven into %s (first run only)", KAFKA_VERSION, jar_dir)
    argv = [
        mvn, "-q", "-B", "-f", str(POM_PATH), "dependency:copy-dependencies",
        f"-DoutputDirectory={jar_dir}", "-DincludeScope=runtime",
    ]  # fmt: skip
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LauncherError("Maven did not finish downloading Kafka's jars within 30 minutes") from exc
    if done.returncode != 0 or not (jar_dir / _MAIN_JAR).exists():
        output = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
        raise LauncherError(
            f"Maven could not download Kafka's jars (exit code {done.returncode}); command: {' '.join(argv)}\n{output}"
        )
    (jar_dir / _COMPLETE_MARKER).write_text(f"kafka {KAFKA_VERSION}\n")
    return jar_dir


def new_cluster_id() -> str:
    """A Kafka cluster id: the 22-character url-safe base64 form of a random UUID."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")


def server_properties(
    data_dir: Path,
    port: int,
    controller_port: int,
    num_partitions: int = 4,
    *,
    node_id: int = 1,
    voters: str | None = None,
    replication: int = 1,
    min_insync: int = 1,
) -> str:
    """The configuration of a KRaft node acting as broker and controller, listening on loopback only: one node alone
    (the defaults), or one of a cluster whose `voters` are every node (docs/cluster.md)."""
    cluster = ""
    if voters is not None:
        # A killed node is fenced (its partitions led elsewhere, dropped from every ISR) within 3 s instead of 9 s,
        # so acks=all writes go on that soon; loopback heartbeats every 0.5 s are cheap.
        cluster = "broker.heartbeat.interval.ms=500\nbroker.session.timeout.ms=3000\nreplica.lag.time.max.ms=10000\n"
    return f"""\
# Written by the Flowtrail launcher on every start; edits are lost.
process.roles=broker,controller
node.id={node_id}
controller.quorum.voters={voters or f"{node_id}@127.0.0.1:{controller_port}"}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs={data_dir}
num.partitions={num_partitions}
default.replication.factor={replication}
min.insync.replicas={min_insync}
offsets.topic.num.partitions=4
offsets.topic.replication.factor={replication}
transaction.state.log.num.partitions=2
transaction.state.log.replication.factor={replication}
transaction.state.log.min.isr={min_insync}
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
delete.topic.enable=true
num.network.threads=2
num.io.threads=4
log.cleaner.dedupe.buffer.size=33554432
{cluster}"""


def _paths(state_dir: Path) -> dict[str, Path]:
    state_dir = Path(state_dir).resolve()
    return {
        "dir": state_dir / "kafka",
        "data": state_dir / "kafka" / "data",
        "config": state_dir / "kafka" / "server.properties",
        "log4j": state_dir / "kafka" / "log4j.properties",
        "pid": state_dir / "kafka.pid",
        "lock": state_dir / "kafka" / ".launcher.lock",
        "log": state_dir / "logs" / "kafka.log",
    }


def format_storage(java: str, jar_dir: Path, config: Path, log4j: Path, data_dir: Path, cluster_id: str) -> None:
    """Format a node's log folder for `cluster_id` unless it already is (its meta.properties exists)."""
    if (data_dir / "meta.properties").exists():
        return
    log.info("formatting Kafka storage in %s (cluster id %s)", data_dir, cluster_id)
    argv = [
        java, f"-Dlog4j.configuration=file:{log4j}", "-cp", f"{jar_dir}/*",
        "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        output = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
        raise LauncherError(f"formatting Kafka's storage failed (exit code {done.returncode}):\n{output}")


def _wait_ready(port: int, process: subprocess.Popen[bytes] | None, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if kafka_answers(port):
            return
        if process is not None and process.poll() is not None:
            raise LauncherError(
                with_log_tail(f"Kafka exited during start-up (exit code {process.returncode})", log_path)
            )
        time.sleep(0.5)
    raise LauncherError(with_log_tail(f"Kafka did not answer on 127.0.0.1:{port} within {timeout:.0f} s", log_path))


def ensure_kafka(
    state_dir: Path,
    port: int = 19092,
    controller_port: int = 19093,
    *,
    num_partitions: int = 4,
    timeout: float = 60.0,
) -> KafkaHandle:
    """A broker answering on ``127.0.0.1:port``: reused when one already answers, else started by us.

    Synchronous and safe to call from a pytest session fixture. Concurrent callers sharing ``state_dir``
    are serialised by a lock file, so only one of them starts the broker.
    """
    paths = _paths(Path(state_dir))
    bootstrap = f"127.0.0.1:{port}"
    paths["dir"].mkdir(parents=True, exist_ok=True)
    with file_lock(paths["lock"]):
        if kafka_answers(port):
            pid = live_pid_from_file(paths["pid"], CMDLINE_MARKER)
            log.info("reusing the Kafka broker already answering on %s", bootstrap)
            return KafkaHandle(bootstrap=bootstrap, started_by_us=False, pid=pid)
        starting = live_pid_from_file(paths["pid"], CMDLINE_MARKER)
        if starting is not None:
            # A broker from an earlier launcher is still starting up (or hung): give it the usual time.
            log.info("waiting for the Kafka broker started earlier (pid %d)", starting)
            _wait_ready(port, None, paths["log"], timeout)
            return KafkaHandle(bootstrap=bootstrap, started_by_us=False, pid=starting)
        for needed in (port, controller_port):
            if not port_is_free(needed) or port_accepts(needed, timeout=0.3):
                raise LauncherError(
                    f"port {needed} is in use by another program (not a Kafka broker we can use); "
                    "stop it or choose other ports"
                )
        java = require_java()
        jar_dir = ensure_kafka_jars(Path(state_dir))
        paths["data"].mkdir(parents=True, exist_ok=True)
        paths["config"].write_text(server_properties(paths["data"], port, controller_port, num_partitions))
        paths["log4j"].write_text(LOG4J_PROPERTIES)
        format_storage(java, jar_dir, paths["config"], paths["log4j"], paths["data"], new_cluster_id())
        argv = [
            java, *JVM_OPTS, f"-Dlog4j.configuration=file:{paths['log4j']}",
            "-cp", f"{jar_dir}/*", "kafka.Kafka", str(paths["config"]),
        ]  # fmt: skip
        log_fd = open_log(paths["log"])
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                cwd=paths["dir"],
                start_new_session=True,
            )
        finally:
            os.close(log_fd)
        write_pid(paths["pid"], process.pid)
        log.info("started Kafka (pid %d), waiting for it to answer on %s", process.pid, bootstrap)
        handle = KafkaHandle(bootstrap, True, process.pid, _process=process, _pid_file=paths["pid"])
        started = time.monotonic()
        try:
            _wait_ready(port, process, paths["log"], timeout)
        except BaseException:
            handle.stop(timeout=10.0)
            raise
        log.info("Kafka is ready after %.1f s", time.monotonic() - started)
        return handle


def kafka_pid(state_dir: Path) -> int | None:
    """The pid of the broker recorded in ``<state_dir>/kafka.pid`` when it still runs."""
    return live_pid_from_file(_paths(Path(state_dir))["pid"], CMDLINE_MARKER)


def stop_kafka(state_dir: Path, timeout: float = 30.0) -> bool:
    """Stop the broker recorded in ``<state_dir>/kafka.pid``; False when none was running."""
    pid_file = _paths(Path(state_dir))["pid"]
    pid = live_pid_from_file(pid_file, CMDLINE_MARKER)
    if pid is None:
        remove_file(pid_file)
        return False
    log.info("stopping Kafka (pid %d)", pid)
    if not terminate(pid, timeout):
        log.warning("Kafka did not stop within %.0f s and was killed", timeout)
    remove_file(pid_file)
    return True
