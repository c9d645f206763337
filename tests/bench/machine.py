"""The machine and versions a benchmark ran on, so figures from different runs can be compared honestly."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

import asyncpg

PACKAGES = ("aiokafka", "faust-streaming", "asyncpg", "fastapi", "uvicorn", "pydantic", "orjson", "aiohttp")


def meminfo_mb() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable", "SwapTotal"):
                out[key] = int(rest.split()[0]) // 1024
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


async def describe(kafka_bootstrap: str, database_url: str) -> dict[str, Any]:
    from deploy.launcher.kafka import KAFKA_VERSION

    mem = meminfo_mb()
    conn = await asyncpg.connect(database_url)
    try:
        pg_version = await conn.fetchval("SHOW server_version")
        pg_settings = {
            name: await conn.fetchval(f"SHOW {name}")
            for name in ("shared_buffers", "synchronous_commit", "fsync", "max_wal_size", "work_mem")
        }
    finally:
        await conn.close()
    external = bool(os.environ.get("FLOWTRAIL_KAFKA_BOOTSTRAP"))
    return {
        "hostname": platform.node(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "memory_total_mb": mem.get("MemTotal"),
        "memory_available_mb": mem.get("MemAvailable"),
        "swap_total_mb": mem.get("SwapTotal"),
        # Other people's tests share this machine: a high load average means noisy figures.
        "loadavg_start": "/".join(f"{x:.2f}" for x in os.getloadavg()),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "packages": package_versions(),
        "kafka_bootstrap": kafka_bootstrap,
        # The launcher's jars; an external broker (FLOWTRAIL_KAFKA_BOOTSTRAP) may run another version.
        "kafka_version": f"{KAFKA_VERSION}{' (launcher; broker is external)' if external else ''}",
        "postgres_version": pg_version,
        "postgres_settings": pg_settings,
    }
