"""Builds the ingest FastAPI app: triggers in, appended to Kafka; nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from schemas.topics import Topics
from services.common import trigger_origin
from services.common.accepted import record_accepted_triggers
from services.common.appender import Appender
from services.common.auth import Authenticator
from services.common.collector import tune_collector
from services.common.connectors import ConnectorRegistry
from services.common.db import keep_session
from services.common.ratelimit import rate_limiter
from services.common.secretstore import SecretReader
from services.common.startup import Database, retry_forever
from services.common.triggerlog import TriggerLog
from services.common.webapp import service_app
from services.common.windows import cursor_window
from services.ingest.adapters.kafka_triggers import KafkaTriggers
from services.ingest.kafka_triggers import KafkaTriggerLimits
from services.ingest.routes import triggers, webhooks
from services.ingest.scheduler import Scheduler, SchedulerTiming
from services.ingest.settings import IngestSettings

log = logging.getLogger(__name__)


# Allocations between young garbage collections (700 by default; services/common/collector.py).
YOUNG_COLLECTION_EVERY = 20_000


def create_app(settings: IngestSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Started without waiting for PostgreSQL either: until it is migrated, requests answer 503 (docs/operations.md).
        # keep_session: ingest leaves no session state on a connection, so a release costs no reset round trip.
        app.state.database = Database(settings.database_url, settings.database_schema, reset=keep_session)
        await app.state.database.start()
        app.state.pool = app.state.database.pool
        app.state.authenticator = Authenticator(app.state.pool, limiter=rate_limiter(app.state.pool, settings))
        # Started without waiting for Kafka: while it is unreachable, triggers answer 503 and /readyz says why.
        app.state.appender, app.state.bulk_appender = (
            Appender(
                settings.kafka_bootstrap, linger_ms=settings.producer_linger_ms, client_id=client_id,
                max_message_bytes=settings.kafka_max_message_bytes, timeout_s=settings.kafka_append_timeout_s,
            )
            for client_id in ("flowtrail-ingest", "flowtrail-ingest-bulk")
        )  # fmt: skip
        await app.state.appender.start()
        await app.state.bulk_appender.start()
        app.state.trigger_log = TriggerLog(
            app.state.appender, Topics(settings.topic_prefix).triggers, bulk=app.state.bulk_appender
        )
        app.state.intake = triggers.intake(settings, app.state.trigger_log, app.state.appender)
        app.state.scheduler = None
        if settings.scheduler:
            app.state.scheduler = Scheduler(
                settings.kafka_bootstrap, Topics(settings.topic_prefix), app.state.trigger_log,
                timing=SchedulerTiming(
                    max_catch_up_s=settings.scheduler_max_catch_up_s, poll_s=settings.scheduler_poll_s
                ),
                windows=functools.partial(cursor_window, app.state.pool),
                accepted=functools.partial(record_accepted_triggers, app.state.pool),
            )  # fmt: skip
        # In the background, retried until Kafka answers: ingest serves (and says it is not ready) meanwhile.
        app.state.scheduler_task = asyncio.create_task(_start_scheduler(app.state.scheduler))
        app.state.kafka_triggers = None
        app.state.secrets = None
        if settings.kafka_triggers:
            # A trigger's kafka connector: the tenant's (decrypted with the secrets key) or the operator's.
            app.state.secrets = SecretReader.from_settings(settings)
            app.state.kafka_triggers = KafkaTriggers(
                settings.kafka_bootstrap, Topics(settings.topic_prefix), app.state.trigger_log, app.state.appender,
                windows=functools.partial(cursor_window, app.state.pool),
                limits=KafkaTriggerLimits(
                    batch=settings.kafka_trigger_batch, max_value_bytes=settings.max_input_bytes,
                    max_executor_lag=settings.kafka_trigger_max_executor_lag,
                    allowed_topics=settings.kafka_trigger_topics,
                    session_timeout_ms=settings.kafka_trigger_session_timeout_ms,
                ),
                connectors=ConnectorRegistry(settings.connectors, app.state.secrets,
                                             setting="FLOWTRAIL_INGEST_CONNECTORS"),
                allow_private=settings.allow_private_networks,
            )  # fmt: skip
        app.state.kafka_triggers_task = asyncio.create_task(_start_scheduler(app.state.kafka_triggers))
        tune_collector(YOUNG_COLLECTION_EVERY)  # what exists now lives as long as the process
        try:
            yield
        finally:
            for task in (app.state.scheduler_task, app.state.kafka_triggers_task):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for background in (app.state.scheduler, app.state.kafka_triggers):
                if background is not None:
                    await background.stop()
            if app.state.secrets is not None:
                await app.state.secrets.close()
            await app.state.appender.stop()
            await app.state.bulk_appender.stop()
            await app.state.database.close()

    app = service_app("Flowtrail ingest", settings, lifespan, ready=_ready, max_body_bytes=settings.max_body_bytes)
    # Outermost: the web console (the API's origin) triggers flows from the browser (docs/console.md).
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.allowed_origins,
        allow_methods=["POST"],
        allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-Id", *trigger_origin.HEADERS],
        expose_headers=[
            "Retry-After",
            "X-Request-Id",
            "X-RateLimit-Limit",
            "X-RateLimit-Remaining",
            "X-RateLimit-Reset",
        ],
        max_age=600,
    )
    app.include_router(triggers.router)
    app.include_router(webhooks.router)
    return app


async def _start_scheduler(scheduler: Scheduler | KafkaTriggers | None) -> None:
    """Starts the scheduler (or the kafka triggers), retried until Kafka answers: every 2 s at most, so ingest is
    ready within seconds of the broker's return however long it was away."""
    if scheduler is None:
        return

    async def attempt() -> None:
        try:
            await scheduler.start()
        except Exception:
            with contextlib.suppress(Exception):
                await scheduler.stop()
            raise

    await retry_forever(f"Kafka for the {type(scheduler).__name__}", attempt)


async def _ready(app: FastAPI) -> dict[str, str | None]:
    """What ingest needs to accept triggers and fire schedules: PostgreSQL (keys, flows), an append that can reach
    Kafka, and the scheduler and the kafka triggers started (when they are on)."""
    started = {
        name: None if task.done() and task.exception() is None else "not started yet: Kafka unreachable"
        for name, task in (("scheduler", app.state.scheduler_task), ("kafka_triggers", app.state.kafka_triggers_task))
    }
    return {"postgres": await app.state.database.check(), "kafka": await app.state.appender.check(), **started}
