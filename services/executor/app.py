"""Builds the executor's faust app: the triggers topic, the engine service and the web pages."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import faust
from aiohttp.web import BaseSite, SockSite
from aiokafka import AIOKafkaClient
from faust.tables import TableManager
from faust.web import Web
from faust.web.drivers.aiohttp import Web as AiohttpWeb
from mode import Service

from schemas.topics import Topics
from services.executor.adapters.flows import FlowRegistry
from services.executor.adapters.ledger import LedgerWriter
from services.executor.engine import Engine
from services.executor.probes import StartupProbes
from services.executor.settings import ExecutorSettings

log = logging.getLogger(__name__)


def wait_for_kafka(settings: ExecutorSettings, probes: StartupProbes) -> None:
    """Until the broker answers, with `/readyz` naming the wait: faust exits when Kafka is away at its start, which
    would be a crash loop (docs/operations.md). Runs on the event loop the worker then uses."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(_wait_for_kafka(settings, probes))


async def _wait_for_kafka(settings: ExecutorSettings, probes: StartupProbes) -> None:
    async def attempt() -> None:
        client = AIOKafkaClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=5000)
        try:
            await client.bootstrap()
        finally:
            await client.close()

    try:
        await attempt()  # the usual case: the broker answers, faust starts at once
    except Exception as exc:
        probes.waiting("kafka", f"waiting for Kafka: {exc!r}")
        # Imported here: it brings FastAPI (~0.3 s of a start), which the executor needs only while it waits.
        from services.common.startup import retry_forever

        await retry_forever("Kafka", attempt, failed=lambda problem: probes.waiting("kafka", problem))
        log.info("Kafka answers at %s; starting the worker", settings.kafka_bootstrap)
    probes.waiting("kafka", "ok")
    probes.waiting("worker", "starting the faust worker")


class _HandedOverWeb(AiohttpWeb):
    """faust's web server, serving on the socket the startup probes listened on: the port never stops answering."""

    probes: StartupProbes | None = None

    def _new_transport_tcp(self) -> BaseSite:
        sock = self.probes.hand_over() if self.probes is not None else None
        return super()._new_transport_tcp() if sock is None else SockSite(self._runner, sock)


class _TablelessManager(TableManager):
    """faust's table manager without the second it waits at every start for tables to be declared: the executor
    declares none (its runs are folded from the ledger), so the consumer subscribes at once."""

    async def on_start(self) -> None:
        if self.values():
            await super().on_start()
        elif not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


class _ExecutorApp(faust.App):
    probes: StartupProbes | None = None

    def _new_web(self) -> Web:
        web = _HandedOverWeb(self)
        web.probes = self.probes
        return web


# Logged as faust's own services are (the worker keeps faust's loggers at WARNING), not as this module.
_ExecutorApp.logger = faust.App.logger
_HandedOverWeb.logger = AiohttpWeb.logger
_TablelessManager.logger = TableManager.logger


def create_app(
    settings: ExecutorSettings, probes: StartupProbes | None = None
) -> tuple[faust.App, faust.TopicT, Engine]:
    topics = Topics(settings.topic_prefix)
    datadir = settings.state_dir / "executor" / settings.topic_prefix
    datadir.mkdir(parents=True, exist_ok=True)
    app = _ExecutorApp(
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
        TableManager=_TablelessManager,
    )
    app.probes = probes
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
