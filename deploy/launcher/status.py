"""`flowtrail status`: every broker (up, the active controller) and service replica, the executor's and projector's
consumer groups with their members' partitions, and how far each group lags behind (docs/cluster.md)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx

from deploy.launcher.brokers import node_pid, quorum_leader
from deploy.launcher.cluster import read_layout
from deploy.launcher.groups import describe_group
from deploy.launcher.kafka import kafka_pid
from deploy.launcher.kafka_wire import broker_ids
from deploy.launcher.layout import Layout
from deploy.launcher.postgres import postgres_answers, postgres_pid
from deploy.launcher.stack import (
    StackPaths,
    kafka_endpoint,
    postgres_endpoint,
    read_stack_json,
    running_supervisor,
)
from services.common.settings import CommonSettings

log = logging.getLogger("flowtrail.launcher")

LAG_TIMEOUT = 15.0


def consumer_groups(settings: CommonSettings) -> dict[str, tuple[str, str]]:
    """Service name → (consumer group, topic) whose lag `status` reports."""
    prefix = settings.topic_prefix
    return {
        "executor": (f"{prefix}-executor", f"{prefix}.triggers"),
        "projector": (f"{prefix}-projector", f"{prefix}.ledger"),
    }


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _projector_offsets_from_pg(settings: CommonSettings, group: str, topic: str) -> dict[int, int] | None:
    """next_offset per partition from ``<schema>.projector_offsets``; None when the table is absent."""
    import asyncpg

    conn = await asyncpg.connect(settings.database_url, timeout=3.0)
    try:
        table = f"{_quote_ident(settings.database_schema)}.projector_offsets"
        if await conn.fetchval("SELECT to_regclass($1)", table) is None:
            return None
        rows = await conn.fetch(
            f"SELECT partition, next_offset FROM {table} WHERE consumer_group = $1 AND topic = $2",
            group,
            topic,
        )
    finally:
        await conn.close()
    return {int(row["partition"]): int(row["next_offset"]) for row in rows}


async def _group_lag(settings: CommonSettings, admin: Any, consumer: Any, service: str) -> dict[str, Any]:
    from aiokafka import TopicPartition

    group, topic = consumer_groups(settings)[service]
    result: dict[str, Any] = {"group": group, "topic": topic, "partitions": [], "total_lag": None}
    described = await admin.describe_topics([topic])
    if not described or described[0]["error_code"] != 0:
        result["error"] = "topic does not exist yet"
        return result
    tps = [
        TopicPartition(topic, p["partition"]) for p in sorted(described[0]["partitions"], key=lambda p: p["partition"])
    ]
    ends = await consumer.end_offsets(tps)
    starts = await consumer.beginning_offsets(tps)
    committed: dict[int, int] | None = None
    result["offsets_from"] = "kafka"
    if service == "projector":
        try:
            committed = await _projector_offsets_from_pg(settings, group, topic)
        except Exception as exc:  # PostgreSQL down or not migrated: fall back to Kafka's offsets
            log.debug("projector offsets from PostgreSQL unavailable: %s", exc)
        if committed is not None:
            result["offsets_from"] = "postgres"
    if committed is None:
        offsets = await admin.list_consumer_group_offsets(group, partitions=tps)
        committed = {tp.partition: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}
    total = 0
    for tp in tps:
        end, start = ends[tp], starts[tp]
        position = committed.get(tp.partition)
        lag = end - (position if position is not None else start)
        total += max(lag, 0)
        result["partitions"].append({"partition": tp.partition, "end": end, "committed": position, "lag": lag})
    result["total_lag"] = total
    result.update(await describe_group(settings.kafka_bootstrap, group, topic))
    return result


async def _kafka_trigger_lag(settings: CommonSettings, admin: Any, consumer: Any) -> dict[str, dict[str, Any]]:
    """Lag of each kafka-triggered flow: its consumer group `<prefix>.kafka-trigger.<tenant>.<flow>.<topic>`
    (docs/kafka-triggers.md), from the group's committed offsets, so a paused flow's waiting messages show."""
    prefix = f"{settings.topic_prefix}.kafka-trigger."
    out: dict[str, dict[str, Any]] = {}
    for group in sorted(g[0] for g in await admin.list_consumer_groups() if g[0].startswith(prefix)):
        committed = await admin.list_consumer_group_offsets(group)
        ends = await consumer.end_offsets(list(committed)) if committed else {}
        parts = [{"partition": tp.partition, "end": ends[tp], "committed": meta.offset, "lag": ends[tp] - meta.offset}
                 for tp, meta in sorted(committed.items(), key=lambda item: item[0].partition)]  # fmt: skip
        topic = next(iter(committed)).topic if committed else "(nothing committed yet)"
        out[f"kafka trigger {group[len(prefix):]}"] = {
            "group": group, "topic": topic, "partitions": parts, "offsets_from": "kafka",
            "total_lag": sum(max(0, p["lag"]) for p in parts),
        }  # fmt: skip
    return out


async def consumer_lag(settings: CommonSettings) -> dict[str, dict[str, Any]]:
    """Lag per partition of the executor and projector consumer groups, and of each kafka-triggered flow."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=5000)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False, request_timeout_ms=5000
    )
    await admin.start()
    try:
        await consumer.start()
        try:
            out: dict[str, dict[str, Any]] = {}
            for service in consumer_groups(settings):
                try:
                    out[service] = await _group_lag(settings, admin, consumer, service)
                except Exception as exc:
                    group, topic = consumer_groups(settings)[service]
                    out[service] = {"group": group, "topic": topic, "error": f"{type(exc).__name__}: {exc}"}
            try:
                out.update(await _kafka_trigger_lag(settings, admin, consumer))
            except Exception as exc:
                out["kafka triggers"] = {"group": "-", "topic": "-", "error": f"{type(exc).__name__}: {exc}"}
            return out
        finally:
            await consumer.stop()
    finally:
        await admin.close()


async def _healthy(client: httpx.AsyncClient, url: str) -> bool:
    try:
        return (await client.get(f"{url}/healthz")).status_code == 200
    except httpx.HTTPError:
        return False


async def _readiness(client: httpx.AsyncClient, url: str) -> dict[str, Any] | None:
    """The service's /readyz answer: {"status": "ready"|"unavailable", "checks": {...}}; None when it is down."""
    try:
        answer = await client.get(f"{url}/readyz")
        body = answer.json()
    except (httpx.HTTPError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def current_layout(settings: CommonSettings) -> Layout:
    """The layout `flowtrail up` (or a LocalCluster) recorded in the state folder, else the default one."""
    _, port, _ = kafka_endpoint(settings)
    return read_layout(StackPaths.of(settings).state_dir) or Layout.plan(kafka_port=port)


def _brokers(settings: CommonSettings, layout: Layout) -> list[dict[str, Any]]:
    """Each node: up (it answers and lists itself), the active controller (the quorum's leader), its pid."""
    state_dir = StackPaths.of(settings).state_dir
    alone = len(layout.brokers) == 1
    leader = None if alone else quorum_leader(state_dir, layout)
    out = []
    for node in layout.brokers:
        # Without a recorded cluster, the one broker is wherever FLOWTRAIL_KAFKA_BOOTSTRAP names first.
        address = settings.kafka_bootstrap.split(",")[0].strip() if alone else node.address
        listed = broker_ids(address)
        up = listed is not None and (alone or node.node_id in listed)
        out.append({
            "node_id": node.node_id, "address": address, "controller_port": node.controller_port, "up": up,
            "controller": up and (alone or node.node_id == leader),
            "pid": kafka_pid(state_dir) if alone else node_pid(state_dir, node),
        })  # fmt: skip
    return out


async def collect_status(settings: CommonSettings) -> dict[str, Any]:
    """Everything `flowtrail status` shows, as plain data (also what `--json` prints)."""
    paths = StackPaths.of(settings)
    layout = current_layout(settings)
    if len(layout.brokers) > 1:
        settings = settings.model_copy(update={"kafka_bootstrap": layout.bootstrap})
    pg_host, pg_port = postgres_endpoint(settings)
    brokers, pg_up = await asyncio.gather(
        asyncio.to_thread(_brokers, settings, layout), asyncio.to_thread(postgres_answers, pg_port, pg_host)
    )
    kafka_up = any(b["up"] for b in brokers)
    addresses = ",".join(b["address"] for b in brokers)
    components: dict[str, dict[str, Any]] = {
        "kafka": {"up": kafka_up, "address": addresses, "pid": brokers[0]["pid"] if len(brokers) == 1 else None},
        "postgres": {"up": pg_up, "address": f"{pg_host}:{pg_port}", "pid": postgres_pid(paths.state_dir)},
    }
    supervisor_pid = running_supervisor(paths)
    stack = read_stack_json(paths) or {}
    # stack.json outlives a supervisor that was killed; its pids mean nothing then.
    supervised = stack.get("services", {}) if supervisor_pid and stack.get("supervisor_pid") == supervisor_pid else {}
    members = layout.members
    async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
        healthy = await asyncio.gather(*(_healthy(client, m.url) for m in members))
        readiness = await asyncio.gather(*(_readiness(client, m.url) for m in members))
    for member, up, ready in zip(members, healthy, readiness, strict=True):
        info = supervised.get(member.name, {})
        components[member.name] = {
            "service": member.service,
            "instance_id": member.instance_id,
            "up": up,
            "ready": bool(ready and ready.get("status") == "ready"),
            "checks": (ready or {}).get("checks", {}),
            "address": f"{member.url}/healthz",
            "pid": info.get("pid"),
            "state": info.get("state"),
            "restarts": info.get("restarts"),
            "crashes_last_minute": info.get("crashes_last_minute"),
            "last_exit": info.get("last_exit"),
            "last_exit_at": info.get("last_exit_at"),
            "last_log": info.get("last_log") or [],
        }
    lag: dict[str, Any] = {}
    if kafka_up:
        try:
            lag = await asyncio.wait_for(consumer_lag(settings), timeout=LAG_TIMEOUT)
        except Exception as exc:
            lag = {"error": f"{type(exc).__name__}: {exc}"}
    api, ingest = layout.of("api"), layout.of("ingest")
    return {
        "state_dir": str(paths.state_dir),
        "supervisor_pid": supervisor_pid,
        "api_url": api[0].url if api else None,
        "ingest_url": ingest[0].url if ingest else None,
        "api_key_path": str(paths.api_key),
        "api_key_present": paths.api_key.exists(),
        "logs_dir": str(paths.logs),
        "brokers": brokers,
        "replication": {"factor": layout.replication_factor, "min_insync_replicas": layout.min_insync_replicas},
        "components": components,
        "consumer_lag": lag,
    }


def _why_failing(info: dict[str, Any]) -> list[str]:
    """For a supervised service that is not ready or crashed within the last minute: its last exit and the last
    lines its log had then (the supervisor keeps restarting it; docs/operations.md)."""
    failing = info.get("state") in ("starting", "restarting") or not info.get("ready", True)
    if info.get("last_exit") is None or not (failing or info.get("crashes_last_minute")):
        return []
    at = time.strftime("%H:%M:%S", time.localtime(info["last_exit_at"])) if info.get("last_exit_at") else "?"
    crashes = info.get("crashes_last_minute") or 0
    lines = [f"             last exit: code {info['last_exit']} at {at}; {crashes} crash(es) in the last minute"]
    if info.get("last_log"):
        lines.append("             its log then:")
        lines += [f"               {line}" for line in info["last_log"]]
    return lines


def render_status(status: dict[str, Any]) -> str:
    """Human-readable form of ``collect_status``."""
    lines = [f"Flowtrail status (state folder {status['state_dir']})"]
    brokers = status.get("brokers") or []
    if len(brokers) > 1:
        replication = status.get("replication") or {}
        lines.append(f"Kafka brokers (replication factor {replication.get('factor')}, "
                     f"min.insync.replicas {replication.get('min_insync_replicas')})")  # fmt: skip
        for b in brokers:
            role = "  controller" if b["controller"] else ""
            pid = f"  pid {b['pid']}" if b.get("pid") else ""
            lines.append(f"  node {b['node_id']:<6} {'up' if b['up'] else 'down':<7} {b['address']}{role}{pid}")
    for name, info in status["components"].items():
        word = "up" if info["up"] else "down"
        if info["up"] and "ready" in info:
            word = "ready" if info["ready"] else "unready"
        extra = [f"{k}: {v}" for k, v in info.get("checks", {}).items() if v != "ok" and not info.get("ready", True)]
        if info.get("pid"):
            extra.append(f"pid {info['pid']}")
        if info.get("restarts"):
            extra.append(f"{info['restarts']} restarts")
        if info.get("state") and info["state"] != "running":
            extra.append(str(info["state"]))
        suffix = f"  ({', '.join(extra)})" if extra else ""
        lines.append(f"  {name:<11} {word:<7} {info['address']}{suffix}")
        lines += _why_failing(info)
    sup = status["supervisor_pid"]
    lines.append(f"  {'supervisor':<11} {'up' if sup else 'down':<7} {f'pid {sup}' if sup else ''}".rstrip())
    lag = status["consumer_lag"]
    if "error" in lag:
        lines.append(f"Consumer lag: unavailable ({lag['error']})")
    elif lag:
        lines.append("Consumer lag")
        for info in lag.values():
            head = f"  {info['group']} on {info['topic']}"
            if "error" in info:
                lines.append(f"{head}: {info['error']}")
                continue
            lines.append(f"{head}: total {info['total_lag']} (offsets from {info['offsets_from']})")
            if "members" in info:
                lines.append(f"    {info.get('state', '?')}, {len(info['members'])} member(s)")
            for member in info.get("members", []):
                parts = ",".join(str(p) for p in member["partitions"]) or "none"
                lines.append(f"    member {member['instance_id'] or member['member_id']}: partitions {parts}")
            for part in info["partitions"]:
                committed = "-" if part["committed"] is None else part["committed"]
                lines.append(
                    f"      p{part['partition']:<3} end {part['end']:<8} committed {committed:<8} lag {part['lag']}"
                )
    if status.get("api_url") and (status["supervisor_pid"] or status["api_key_present"]):
        lines.append(f"API {status['api_url']}   ingest {status['ingest_url']}   key file {status['api_key_path']}")
    return "\n".join(lines)
