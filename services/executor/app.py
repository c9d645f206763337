"""Builds the executor's faust app: the triggers topic, the engine service and the web pages."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import faust
from aiohttp import web
from aiokafka import AIOKafkaClient
from mode import Service

from schemas.topics import Topics
from services.common.startup import retry_forever
from services.executor.adapters.flows import FlowRegistry
from services.executor.adapters.ledger import LedgerWriter
from services.executor.engine import Engine
from services.executor.settings import ExecutorSettings

log = logging.getLogger(__name__)


def wait_for_kafka(settings: ExecutorSettings) -> None:
    """Until the broker answers, serve /healthz (alive) and /readyz (503, waiting for Kafka) on the worker's port:
    faust exits when Kafka is away at its start, which would be a crash loop (docs/operations.md). Runs on the event
    loop the worker then uses."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(_wait_for_kafka(settings))


async def _wait_for_kafka(settings: ExecutorSettings) -> None:
    waiting = {"kafka": "not tried yet", "partitions": "not assigned yet"}

    async def attempt() -> None:
        client = AIOKafkaClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=5000)
        try:
            await client.bootstrap()
        finally:
            await client.close()

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "active_runs": 0, "partitions": [], "replaying": []})

    async def readyz(request: web.Request) -> web.Response:
        return web.json_response({"status": "unavailable", "checks": waiting}, status=503,
                                 headers={"Retry-After": "5"})  # fmt: skip

    try:
        await attempt()  # the usual case: the broker answers, faust starts at once
        return
    except Exception as exc:
        waiting["kafka"] = f"waiting for Kafka: {exc!r}"
    pages = web.Application()
    pages.router.add_get("/healthz", healthz)
    pages.router.add_get("/readyz", readyz)
    runner = web.AppRunner(pages, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.web_host, settings.web_port).start()
    try:
        await retry_forever("Kafka", attempt, failed=lambda problem: waiting.update(kafka=problem))
    finally:
        await runner.cleanup()
    log.info("Kafka answers at %s; starting the worker", settings.kafka_bootstrap)


def create_app(settings: ExecutorSettings) -> tuple[faust.App, faust.TopicT, Engine]:
    topics = Topics(settings.topic_prefix)
    datadir = settings.state_dir / "executor" / settings.topic_prefix
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        f"{settings.topic_prefix}-executor",
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        value_serializer="raw",
        key_serializer="raw",
        topic_partitions=settings.partitions,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.session_timeout_s / 3),
        # Static membership: a restarted executor rejoins as itself and gets its partitions back without a
        # rebalance or waiting out its old session (docs/decisions.md).
        consumer_group_instance_id=settings.group_instance_id,
        web_host=settings.web_host,
        web_bind=settings.web_host,
        web_port=settings.web_port,
        datadir=str(datadir),
    )
    # Triggers and commands in one stream: both keyed by run_id with the same partition count, so faust assigns
    # partition N of both to the worker that owns the runs of ledger partition N.
    triggers = app.topic(topics.triggers, topics.commands, value_type=bytes, key_type=bytes, internal=False)
    engine = Engine(
        settings,
        LedgerWriter(settings.kafka_bootstrap, topics.ledger, linger_ms=settings.producer_linger_ms),
        FlowRegistry(settings.kafka_bootstrap, topics.flows),
    )

    class EngineService(Service):
        """Starts and stops the engine with the worker."""

        async def on_start(self) -> None:
            await engine.start()

        async def on_stop(self) -> None:
            await engine.close()
            await engine.flows.stop()
            await engine.ledger.stop()

    app.service(EngineService)

    # faust's signal typing wants the receiver's extra arguments as *args; it passes them positionally.
    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def on_assigned(sender: Any, assigned: Any, **kwargs: Any) -> None:
        # faust resumes fetching before this returns (its recovery resumes the streams first when there are no
        # tables), so the engine itself holds each partition's inputs until its runs are rebuilt from the ledger.
        await engine.assign((tp.partition for tp in assigned if tp.topic == topics.triggers), background=True)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked(sender: Any, revoked: Any, **kwargs: Any) -> None:
        await engine.revoke(tp.partition for tp in revoked if tp.topic == topics.triggers)

    return app, triggers, engine
