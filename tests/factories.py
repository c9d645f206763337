"""Realistic ledger events for tests and benchmarks, produced the way the executor writes them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaProducer

from schemas import codec
from schemas import events as ev
from schemas.events import EventBase, TriggerInfo


def run_events(run_id: str, *, tenant_id: str = "t1", flow_id: str = "f1", steps: int = 3, fail_at: int | None = None,
               start: datetime | None = None) -> list[EventBase]:  # fmt: skip
    """RunRequested … RunSucceeded (or RunFailed at step `fail_at`), seq 0..n-1, 10 ms apart."""
    t0 = start or datetime.now(UTC)
    out: list[EventBase] = []

    def emit(cls: Any, payload: dict[str, Any]) -> None:
        seq = len(out)
        out.append(cls(
            tenant_id=tenant_id, run_id=run_id, flow_id=flow_id, flow_version=1, seq=seq,
            occurred_at=t0 + timedelta(milliseconds=10 * seq), causation_id=f"{run_id}:c{seq}",
            correlation_id=run_id, payload=payload,
        ))  # fmt: skip

    emit(ev.RunRequested, {"trigger": TriggerInfo(type="api", caller="key_1", payload={"n": run_id}), "flow_name": "F"})
    emit(ev.RunQueued, {})
    emit(ev.RunStarted, {})
    for i in range(steps):
        name = f"step{i}"
        emit(ev.StepStarted, {"step": name, "action": "transform", "input": {"i": i}})
        if i == fail_at:
            error = {"category": "VALIDATION", "message": f"{name} rejected the record"}
            emit(ev.StepFailed, {"step": name, "error": error, "duration_ms": 1.5})
            emit(ev.RunFailed, {"duration_ms": 42.0, "failed_step": name, "error": error})
            return out
        emit(ev.StepSucceeded, {"step": name, "output": {"i": i, "ok": True}, "duration_ms": 1.5})
    emit(ev.RunSucceeded, {"duration_ms": 42.0})
    return out


async def produce(bootstrap: str, topic: str, events: list[EventBase], partitions: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=512 * 1024)
    await producer.start()
    try:
        futures = []
        for e in events:
            # Same placement as the executor: one partition per run.
            partition = hash(e.run_id) % partitions
            futures.append(await producer.send(topic, codec.dumps(e), key=e.run_id.encode(), partition=partition))
        for f in futures:
            await f
    finally:
        await producer.stop()


async def keep_history(conn: Any, *tenant_ids: str) -> None:
    """Tests that write events at fixed past dates: keep their runs and payloads whatever day the suite runs on
    (the default retention of 90 days and 7 days for payloads would purge them as the calendar moves on)."""
    await conn.execute(
        "UPDATE tenants SET retention_days = 36500, payload_retention_days = 36500 WHERE id = ANY($1::text[])",
        list(tenant_ids),
    )
