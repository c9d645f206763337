"""Find or install PostgreSQL, then create, start, reuse and stop a private cluster for local runs."""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import re
import shutil
import socket
import stat
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from deploy.launcher.aio import run_sync
from deploy.launcher.errors import LauncherError
from deploy.launcher.procs import file_lock, pid_alive, port_accepts, port_is_free, with_log_tail

log = logging.getLogger("flowtrail.launcher")

DB_USER = "flowtrail"
DB_NAME = "flowtrail"
_SYSTEM_USER = "postgres"
# A unix socket path must fit in sockaddr_un (107 bytes); longer state folders get TCP only.
_MAX_SOCKET_DIR = 90


def dsn_for(port: int, database: str = DB_NAME) -> str:
    return f"postgresql://{DB_USER}@127.0.0.1:{port}/{database}"


@dataclass
class PgHandle:
    """A PostgreSQL server the launcher ensured; ``stop()`` only stops it when this process started it."""

    dsn: str
    started_by_us: bool
    state_dir: Path | None = None

    def stop(self) -> None:
        """Fast shutdown of the cluster we started. A no-op for a reused server."""
        if not self.started_by_us or self.state_dir is None:
            return
        stop_postgres(self.state_dir)
        self.started_by_us = False


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.parent.name)) or (0,)


def find_pg_bin() -> Path | None:
    """The ``bin`` folder of the newest PostgreSQL server under ``/usr/lib/postgresql``."""
    candidates = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    if not candidates:
        return None
    return max(candidates, key=lambda b: _version_key(b / "initdb"))


def ensure_pg_bin() -> Path:
    """The server binaries, installing the ``postgresql`` package with apt when we are root."""
    found = find_pg_bin()
    if found is not None:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise LauncherError(
            "PostgreSQL server binaries were not found under /usr/lib/postgresql: "
            "install them with `sudo apt-get install postgresql` (any version 13+)"
        )
    log.info("installing PostgreSQL with apt-get (first run only)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"],
    ):
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800, check=False)
        if done.returncode != 0:
            output = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
            raise LauncherError(f"`{' '.join(argv)}` failed (exit code {done.returncode}):\n{output}")
    found = find_pg_bin()
    if found is None:
        raise LauncherError("apt-get installed postgresql but no server binaries appeared in /usr/lib/postgresql")
    return found


def postgres_answers(port: int, host: str = "127.0.0.1", timeout: float = 2.0) -> bool:
    """True when a PostgreSQL server answers an SSLRequest on ``host:port`` (no login needed)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(struct.pack(">ii", 8, 80877103))
            reply = sock.recv(1)
    except OSError:
        return False
    return reply in (b"S", b"N")


async def _ensure_database(port: int, connect_timeout: float) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn_for(port, "postgres"), timeout=connect_timeout)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DB_NAME)
        if not exists:
            log.info("creating database %s", DB_NAME)
            await conn.execute(f'CREATE DATABASE "{DB_NAME}"')
    finally:
        await conn.close()


def _connect_and_create_db(port: int, timeout: float = 10.0) -> None:
    """Log in as ``flowtrail`` (trust auth) and create the database when missing; LauncherError if refused."""
    import asyncpg

    deadline = time.monotonic() + timeout
    while True:
        try:
            run_sync(lambda: _ensure_database(port, connect_timeout=5.0))
            return
        except asyncpg.CannotConnectNowError:
            if time.monotonic() >= deadline:
                raise LauncherError(f"PostgreSQL on port {port} is still starting up or shutting down") from None
            time.sleep(0.5)
        except (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidPasswordError) as exc:
            raise LauncherError(
                f"port {port} is in use by a PostgreSQL server that does not let user {DB_USER} in "
                f"without a password ({exc}); stop it or choose another port"
            ) from None
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise LauncherError(f"could not prepare database {DB_NAME} on port {port}: {exc}") from None


def _as_cluster_owner() -> list[str]:
    """``runuser -u postgres --`` when we are root (initdb and postgres refuse to run as root)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(_SYSTEM_USER)
    except KeyError:
        raise LauncherError(
            f"running as root needs the system user {_SYSTEM_USER!r} to own the cluster: "
            "apt-get install postgresql creates it (or: useradd --system postgres)"
        ) from None
    return ["runuser", "-u", _SYSTEM_USER, "--"]


def _give_to_cluster_owner(path: Path, recursive: bool = False) -> None:
    if os.geteuid() != 0:
        return
    owner = pwd.getpwnam(_SYSTEM_USER)
    paths = [path, *path.rglob("*")] if recursive else [path]
    for item in paths:
        os.chown(item, owner.pw_uid, owner.pw_gid, follow_symlinks=False)


def _make_traversable(path: Path) -> None:
    """Let the ``postgres`` user reach ``path``: add o+x to every parent folder that lacks it."""
    if os.geteuid() != 0:
        return
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.info("chmod o+x %s (so the postgres user can reach the state folder)", parent)
            parent.chmod(mode | stat.S_IXOTH)


def _run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _as_cluster_owner() + argv,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        check=False,
        start_new_session=True,
    )


def _initdb(pg_bin: Path, root: Path, data: Path) -> None:
    log.info("creating a PostgreSQL cluster in %s (first run only)", data)
    output = ""
    for locale in ("C.UTF-8", "C"):
        argv = [
            str(pg_bin / "initdb"), "-D", str(data), "-U", DB_USER, "--auth=trust",
            "-E", "UTF8", f"--locale={locale}",
        ]  # fmt: skip
        done = _run(argv, cwd=root)
        if done.returncode == 0:
            return
        output = (done.stdout + done.stderr).strip()
        if data.exists():
            shutil.rmtree(data)
        if "locale" not in output.lower():
            break
    tail = "\n".join(output.splitlines()[-20:])
    raise LauncherError(f"initdb failed for {data}:\n{tail}")


def _write_config(root: Path, data: Path, port: int) -> None:
    socket_dir = str(root) if len(str(root)) <= _MAX_SOCKET_DIR else ""
    overrides = f"""\
# Written by the Flowtrail launcher on every start; edits are lost.
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{socket_dir}'
fsync = on
synchronous_commit = on
full_page_writes = on
shared_buffers = 256MB
# Local SSD/page cache, not spinning disks: with the default 4.0 the planner walked the retention index and
# filtered ~8,600 rows for a flow + status runs page (4.2 ms) instead of using the flow index (0.65 ms).
random_page_cost = 1.1
max_connections = 200
logging_collector = off
log_destination = 'stderr'
log_line_prefix = '%m [%p] %q%u@%d '
"""
    override_file = data / "flowtrail.conf"
    override_file.write_text(overrides)
    _give_to_cluster_owner(override_file)
    main_conf = data / "postgresql.conf"
    text = main_conf.read_text()
    include = "include_if_exists = 'flowtrail.conf'"
    if include not in text:
        main_conf.write_text(text.rstrip("\n") + f"\n\n{include}\n")


def _paths(state_dir: Path) -> dict[str, Path]:
    state_dir = Path(state_dir).resolve()
    return {
        "root": state_dir / "postgres",
        "data": state_dir / "postgres" / "data",
        "lock": state_dir / "postgres.lock",
        "log": state_dir / "logs" / "postgres.log",
    }


def _cluster_running(pg_bin: Path, root: Path, data: Path) -> bool:
    if not (data / "postmaster.pid").exists():
        return False
    return _run([str(pg_bin / "pg_ctl"), "-D", str(data), "status"], cwd=root, timeout=30).returncode == 0


def ensure_postgres(state_dir: Path, port: int = 15432) -> PgHandle:
    """A PostgreSQL server on ``127.0.0.1:port`` with database ``flowtrail``: reused, or started by us.

    Synchronous and safe to call from a pytest session fixture (asyncpg runs in a private event loop).
    """
    paths = _paths(Path(state_dir))
    root, data, log_path = paths["root"], paths["data"], paths["log"]
    dsn = dsn_for(port)
    with file_lock(paths["lock"]):
        if postgres_answers(port):
            _connect_and_create_db(port)
            log.info("reusing the PostgreSQL server already answering on port %d", port)
            return PgHandle(dsn=dsn, started_by_us=False)
        if not port_is_free(port) or port_accepts(port, timeout=0.3):
            raise LauncherError(
                f"port {port} is in use by another program (not PostgreSQL); stop it or choose another port"
            )
        pg_bin = ensure_pg_bin()
        root.mkdir(parents=True, exist_ok=True)
        _make_traversable(root)
        _give_to_cluster_owner(root)
        if data.exists() and os.geteuid() == 0 and data.stat().st_uid != pwd.getpwnam(_SYSTEM_USER).pw_uid:
            _give_to_cluster_owner(data, recursive=True)
        if not (data / "PG_VERSION").exists():
            if data.exists() and not any(data.iterdir()):
                data.rmdir()
            _initdb(pg_bin, root, data)
        if _cluster_running(pg_bin, root, data):
            raise LauncherError(
                f"the PostgreSQL cluster in {data} is running but not answering on port {port}; "
                "stop it first with `flowtrail down`"
            )
        _write_config(root, data, port)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.touch(exist_ok=True)
        _give_to_cluster_owner(log_path)
        log.info("starting PostgreSQL on port %d", port)
        started = time.monotonic()
        argv = [str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(log_path), "-w", "-t", "60", "start"]
        try:
            done = _run(argv, cwd=root, timeout=90)
        except subprocess.TimeoutExpired:
            done = None
        if done is None or done.returncode != 0:
            detail = "" if done is None else (done.stdout + done.stderr).strip()
            raise LauncherError(with_log_tail(f"PostgreSQL did not start: {detail or 'timed out'}", log_path))
        handle = PgHandle(dsn=dsn, started_by_us=True, state_dir=Path(state_dir).resolve())
        try:
            _connect_and_create_db(port, timeout=30.0)
        except BaseException:
            handle.stop()
            raise
        log.info("PostgreSQL is ready after %.1f s", time.monotonic() - started)
        return handle


def stop_postgres(state_dir: Path, timeout: int = 60) -> bool:
    """Fast shutdown of the cluster in ``<state_dir>/postgres/data``; False when it was not running."""
    paths = _paths(Path(state_dir))
    root, data = paths["root"], paths["data"]
    pg_bin = find_pg_bin()
    if pg_bin is None or not data.exists():
        return False
    if not _cluster_running(pg_bin, root, data):
        return False
    log.info("stopping PostgreSQL (%s)", data)
    argv = [str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", str(timeout), "stop"]
    done = _run(argv, cwd=root, timeout=timeout + 30)
    if done.returncode != 0:
        raise LauncherError(with_log_tail(f"pg_ctl stop failed: {(done.stdout + done.stderr).strip()}", paths["log"]))
    return True


def postgres_pid(state_dir: Path) -> int | None:
    """The postmaster pid of the cluster in ``<state_dir>/postgres/data`` (None when not running)."""
    pid_file = _paths(Path(state_dir))["data"] / "postmaster.pid"
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int(pid_file.read_text().splitlines()[0])
        return pid if pid_alive(pid) else None
    return None
