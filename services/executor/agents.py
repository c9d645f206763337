"""The executor's faust agent: triggers and commands in; everything else happens in the engine."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import faust
from prometheus_client import generate_latest

from schemas import codec
from schemas.events import CommandBase, TriggerReceived
from services.executor import metrics
from services.executor.batches import take_ready
from services.executor.engine import Engine

log = logging.getLogger(__name__)


def register(app: faust.App, triggers: faust.TopicT, engine: Engine, dlq_topic: str, batch: int) -> None:
    dlq = app.topic(dlq_topic, value_type=bytes, key_type=bytes, internal=False)

    # Concurrency 1 per partition (invariant 3): parallelism comes from partitions and step tasks.
    @app.agent(triggers, concurrency=1)
    async def consume_inputs(stream: faust.StreamT[Any]) -> None:
        # No batching window: an idle executor decides on an input at once; a busy one takes all that arrived
        # while it handled the last batch (services/executor/batches.py).
        async for taken in take_ready(stream, batch):
            parsed: list[tuple[int, TriggerReceived]] = []
            commands: list[tuple[int, CommandBase]] = []
            for event in taken.events:
                message = event.message
                is_command = message.topic.endswith(".commands")
                try:
                    if is_command:
                        commands.append((message.partition, codec.decode_command(event.value)))
                    else:
                        parsed.append((message.partition, codec.decode_trigger(event.value)))
                except codec.DecodeError as exc:
                    (metrics.COMMANDS.labels("undecodable", "dead_lettered") if is_command
                     else metrics.TRIGGERS.labels("dead_lettered")).inc()  # fmt: skip
                    log.warning("%s at %s@%s dead-lettered: %s", message.topic, message.partition, message.offset, exc)
                    await dlq.send(
                        key=event.key,
                        value=event.value,
                        headers={"flowtrail-reason": str(exc).encode(), "flowtrail-source": message.topic.encode()},
                    )
            # Each returns the futures of the records its inputs caused; the inputs' offsets commit once those are
            # durable, while the next batch is already being decided.
            if parsed:
                taken.durable += await engine.on_triggers(parsed)
            if commands:
                taken.durable += await engine.on_commands(commands)

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        return web.json({"status": "ok", "active_runs": len(engine.runs), "partitions": sorted(engine.owned),
                         "replaying": sorted(engine.replaying)})  # fmt: skip

    @app.page("/readyz")
    async def readyz(web: Any, request: Any) -> Any:
        """503 while inputs would wait: the ledger cannot be reached, no assignment came yet, or assigned partitions are
        still replaying."""
        checks: dict[str, str] = {}
        try:
            async with asyncio.timeout(3):
                await engine.ledger.producer.client.fetch_all_metadata()
            checks["kafka"] = "ok"
        except Exception as exc:  # not started, unreachable, timed out: each means not ready
            checks["kafka"] = f"Kafka unreachable: {exc!r}"
        if not engine.partitions.assigned:
            checks["partitions"] = "waiting for the consumer group's first assignment"
        elif engine.replaying:
            checks["partitions"] = f"replaying {sorted(engine.replaying)}"
        else:
            checks["partitions"] = f"serving {sorted(engine.owned)}"
        ok = checks["kafka"] == "ok" and engine.partitions.assigned and not engine.replaying
        return web.json({"status": "ready" if ok else "unavailable", "checks": checks}, status=200 if ok else 503)

    @app.page("/metrics")
    async def prometheus(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(), content_type="text/plain; version=0.0.4")
