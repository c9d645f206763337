"""`flowtrail up`: Kafka (one broker or a local cluster), PostgreSQL, bootstrap, then the services' replicas
supervised, in front or detached (docs/cluster.md)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeVar

from deploy.launcher.brokers import KafkaCluster
from deploy.launcher.cluster import LAYOUT_FILE, Replicas, write_layout
from deploy.launcher.errors import LauncherError
from deploy.launcher.kafka import ensure_kafka
from deploy.launcher.kafka_wire import kafka_answers
from deploy.launcher.layout import ClusterSettings, Layout
from deploy.launcher.postgres import ensure_postgres, postgres_answers, postgres_pid
from deploy.launcher.procs import open_log, remove_file, terminate, with_log_tail, write_pid
from deploy.launcher.stack import (
    API_URL,
    HEALTH_TIMEOUT,
    INGEST_URL,
    LOOPBACK,
    StackPaths,
    banner,
    kafka_endpoint,
    postgres_endpoint,
    read_api_key,
    read_stack_json,
    remove_own_files,
    running_supervisor,
    service_env,
    write_api_key,
    write_json_atomic,
)
from deploy.launcher.supervisor import Supervisor
from deploy.launcher.tenants_cmd import ensure_operator_key
from services.common.crypto import ensure_key_file
from services.common.settings import REPO_ROOT, CommonSettings

log = logging.getLogger("flowtrail.launcher")
T = TypeVar("T")

DETACH_TIMEOUT = 300.0
SUPERVISOR_STOP_TIMEOUT = 120.0


class _Stopped(Exception):
    """Ctrl-C or SIGTERM arrived while a start-up step was still running."""


@dataclass
class _Infra:
    """What `up` must undo on the way out, and what stack.json says about Kafka and PostgreSQL."""

    teardown: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    kafka: dict[str, Any] = field(default_factory=dict)
    postgres: dict[str, Any] = field(default_factory=dict)


def console_line(stack: dict[str, Any]) -> str:
    """Where the web console is (docs/console.md): the API's own address, signed in with the key above."""
    return f"Console: open {stack['api_url']}/ in a browser and sign in with the API key above.\n"


def plan(settings: CommonSettings, cluster: ClusterSettings) -> Layout:
    """The brokers and replicas to start: node 1 where FLOWTRAIL_KAFKA_BOOTSTRAP points, the others on the ports
    after it (docs/cluster.md)."""
    _, port, _ = kafka_endpoint(settings)
    return Layout.plan(brokers=cluster.brokers, executors=cluster.executors, projectors=cluster.projectors,
                       kafka_port=port)  # fmt: skip


def load_hook(module: str, attr: str) -> Any:
    """``module.attr``, imported lazily; a LauncherError when the module itself does not exist."""
    try:
        loaded = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            raise LauncherError(f"{module} is missing (it provides {attr}())") from None
        raise
    return getattr(loaded, attr)


def _ensure_infra(settings: CommonSettings, paths: StackPaths, infra: _Infra, layout: Layout) -> None:
    k_host, k_port, k_controller = kafka_endpoint(settings)
    if len(layout.brokers) > 1:
        if k_host not in LOOPBACK:
            raise LauncherError(f"--brokers {len(layout.brokers)} starts a cluster on this machine, but "
                                f"FLOWTRAIL_KAFKA_BOOTSTRAP names {k_host}")  # fmt: skip
        cluster = KafkaCluster(paths.state_dir, layout)
        cluster.start()
        infra.teardown.append(("the Kafka cluster", cluster.stop))
        infra.kafka = {"bootstrap": layout.bootstrap, "brokers": len(layout.brokers), "started_by_us": True,
                       "replication_factor": layout.replication_factor,
                       "pids": {n.node_id: cluster.pid(n.node_id) for n in layout.brokers}}  # fmt: skip
    elif k_host in LOOPBACK:
        kafka = ensure_kafka(paths.state_dir, k_port, k_controller, num_partitions=settings.partitions)
        if kafka.started_by_us:
            infra.teardown.append(("Kafka", kafka.stop))
        infra.kafka = {"bootstrap": kafka.bootstrap, "started_by_us": kafka.started_by_us, "pid": kafka.pid}
    elif not kafka_answers(k_port, k_host):
        raise LauncherError(f"no Kafka broker answers at {settings.kafka_bootstrap} (FLOWTRAIL_KAFKA_BOOTSTRAP)")
    else:
        infra.kafka = {"bootstrap": settings.kafka_bootstrap, "started_by_us": False, "pid": None}

    pg_host, pg_port = postgres_endpoint(settings)
    if pg_host in LOOPBACK:
        pg = ensure_postgres(paths.state_dir, pg_port)
        if pg.started_by_us:
            infra.teardown.append(("PostgreSQL", pg.stop))
        infra.postgres = {
            "dsn": settings.database_url,
            "started_by_us": pg.started_by_us,
            "pid": postgres_pid(paths.state_dir),
        }
    elif not postgres_answers(pg_port, pg_host):
        raise LauncherError(f"no PostgreSQL answers at {pg_host}:{pg_port} (FLOWTRAIL_DATABASE_URL)")
    else:
        infra.postgres = {"dsn": settings.database_url, "started_by_us": False, "pid": None}


async def _until(stop: asyncio.Event, coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` unless ``stop`` is set first (then cancel it and raise _Stopped)."""
    task = asyncio.ensure_future(coro)
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        stopper.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise _Stopped


async def run_demo_safely(settings: CommonSettings, api_key: str, stop: asyncio.Event | None = None) -> None:
    """Run the demo; a failing demo is reported but never takes the stack down."""
    run_demo = load_hook("deploy.launcher.demo", "run_demo")
    try:
        if stop is None:
            await run_demo(settings, api_key)
        else:
            await _until(stop, run_demo(settings, api_key))
    except (_Stopped, asyncio.CancelledError):
        raise
    except Exception as exc:
        print(
            f"flowtrail: the demo failed ({type(exc).__name__}: {exc}); the stack keeps running",
            file=sys.stderr,
        )


async def _serve(settings: CommonSettings, paths: StackPaths, infra: _Infra, layout: Layout, *, demo: bool) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    supervisor: Supervisor | None = None
    stack: dict[str, Any] = {}

    def publish() -> None:
        if supervisor is None or not stack.get("ready"):
            return
        stack["services"] = supervisor.status()
        stack["pids"] = {name: info["pid"] for name, info in stack["services"].items()}
        write_json_atomic(paths.stack_json, stack)

    try:
        bootstrap = load_hook("deploy.launcher.bootstrap", "bootstrap")
        log.info("bootstrapping: topics, migrations, demo flows, tenant and API key")
        result = await _until(stop, bootstrap(settings))
        # A service's restart delay is back at its shortest once it answers ready (docs/operations.md).
        replicas = Replicas(paths.logs, layout, on_change=publish)
        supervisor = replicas.supervisor
        log.info("starting the services; waiting for each to answer /healthz")
        env = service_env(settings)
        # The operator routes' key (docs/tenants.md): generated into the state folder once, unless the env gives it.
        env.setdefault("FLOWTRAIL_API_OPERATOR_KEY", ensure_operator_key(paths.state_dir))
        await _until(stop, replicas.start(env, page="/healthz", within=HEALTH_TIMEOUT))
        api_key = str(result.api_key)
        write_api_key(paths, api_key)
        flow_ids = list(getattr(result, "flow_ids", None) or [])
        stack.update(
            ready=True,
            supervisor_pid=os.getpid(),
            started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            api_url=API_URL,
            ingest_url=INGEST_URL,
            api_key_path=str(paths.api_key),
            tenant_id=str(result.tenant_id),
            example_flow_id=str(flow_ids[0]) if flow_ids else None,
            logs_dir=str(paths.logs),
            kafka=infra.kafka,
            postgres=infra.postgres,
        )
        publish()
        print(banner(stack, api_key, paths) + console_line(stack), flush=True)
        if demo:
            await run_demo_safely(settings, api_key, stop)
        print(f"Flowtrail is running; the console is at {stack['api_url']}/. Press Ctrl-C to stop it "
              "(or run `flowtrail down`).", flush=True)  # fmt: skip
        await stop.wait()
    except _Stopped:
        pass
    finally:
        print("stopping Flowtrail ...", flush=True)
        if supervisor is not None:
            await supervisor.stop_all()


def ensure_secrets_key(settings: CommonSettings) -> None:
    """The key that encrypts secrets at rest (docs/secrets.md): generated into the state folder, mode 600, unless
    FLOWTRAIL_SECRETS_KEY gives it; every service then reads the same file."""
    if settings.secrets_key_value:
        return
    path = settings.secrets_key_path
    existed = path.exists()
    try:
        ensure_key_file(path)
    except (OSError, ValueError) as exc:
        raise LauncherError(f"secrets key {path}: {exc}") from None
    if not existed:
        log.info("generated the secrets key in %s (mode 600); keep it: without it stored secrets cannot be read", path)


def _already_running(pid: int) -> str:
    return f"Flowtrail is already running (supervisor pid {pid}); see `flowtrail status` or `flowtrail down`"


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_up(settings: CommonSettings, *, demo: bool, cluster: ClusterSettings | None = None) -> int:
    """Start everything in this process and keep it running until Ctrl-C / SIGTERM; then stop it all."""
    paths = StackPaths.of(settings)
    layout = plan(settings, cluster or ClusterSettings())
    if len(layout.brokers) > 1:
        settings = settings.model_copy(update={"kafka_bootstrap": layout.bootstrap})
    other = running_supervisor(paths)
    if other is not None and other != os.getpid():
        raise LauncherError(_already_running(other))
    paths.logs.mkdir(parents=True, exist_ok=True)
    ensure_secrets_key(settings)
    write_pid(paths.supervisor_pid, os.getpid())
    remove_file(paths.stack_json)
    write_layout(paths.state_dir, layout)
    infra = _Infra()
    # Until the event loop takes over the signals, SIGTERM unwinds like Ctrl-C so the finally block runs.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        _ensure_infra(settings, paths, infra, layout)
        asyncio.run(_serve(settings, paths, infra, layout, demo=demo))
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for name, stop in reversed(infra.teardown):
            print(f"stopping {name} ...", flush=True)
            try:
                stop()
            except Exception as exc:
                print(f"flowtrail: could not stop {name}: {exc}", file=sys.stderr)
        remove_own_files(paths)
        remove_file(paths.state_dir / LAYOUT_FILE)
        print("Flowtrail stopped.", flush=True)


def run_up_detached(
    settings: CommonSettings, *, demo: bool, partitions: int | None, cluster: ClusterSettings | None = None
) -> int:
    """Start `up` as a background daemon, wait until it is healthy, print the banner and return."""
    paths = StackPaths.of(settings)
    other = running_supervisor(paths)
    if other is not None:
        raise LauncherError(_already_running(other))
    paths.logs.mkdir(parents=True, exist_ok=True)
    remove_file(paths.stack_json)
    argv = [sys.executable, "-u", "-m", "deploy.launcher.cli", "up", "--no-demo", "--daemon"]
    if partitions is not None:
        argv += ["--partitions", str(partitions)]
    for name, count in (cluster or ClusterSettings()).model_dump().items():
        argv += [f"--{name}", str(count)]
    log_fd = open_log(paths.supervisor_log)
    try:
        daemon = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=subprocess.STDOUT,
            cwd=REPO_ROOT, start_new_session=True,
        )  # fmt: skip
    finally:
        os.close(log_fd)
    print(
        f"starting Flowtrail in the background (pid {daemon.pid}); progress: {paths.supervisor_log}",
        flush=True,
    )
    deadline = time.monotonic() + DETACH_TIMEOUT
    try:
        while True:
            stack = read_stack_json(paths)
            if stack and stack.get("supervisor_pid") == daemon.pid and stack.get("ready"):
                break
            if daemon.poll() is not None:
                raise LauncherError(
                    with_log_tail(
                        f"the background launcher exited with code {daemon.returncode}",
                        paths.supervisor_log,
                        40,
                    )
                )
            if time.monotonic() >= deadline:
                terminate(daemon.pid, SUPERVISOR_STOP_TIMEOUT)
                raise LauncherError(
                    with_log_tail(f"Flowtrail did not come up within {DETACH_TIMEOUT:.0f} s", paths.supervisor_log)
                )
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping the background launcher ...", file=sys.stderr, flush=True)
        terminate(daemon.pid, SUPERVISOR_STOP_TIMEOUT)
        return 130
    api_key = read_api_key(paths)
    print(banner(stack, api_key, paths) + console_line(stack), flush=True)
    if demo:
        asyncio.run(run_demo_safely(settings, api_key))
    print(f"Flowtrail runs in the background (supervisor pid {daemon.pid}); stop it with `flowtrail down`.")
    return 0
