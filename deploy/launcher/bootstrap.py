"""`flowtrail up`'s bootstrap: topics, migrations, the demo tenant and its API key, the demo flows."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from deploy.launcher.demo_flows import DEMO_TENANT, demo_flows
from deploy.launcher.errors import LauncherError
from schemas.events import FlowVersionPublished
from schemas.flows import FlowDefinition
from schemas.topics import Topics
from services.common.auth import create_api_key, ensure_tenant, verify_api_key
from services.common.crypto import Keyring, open_flow, seal_flow
from services.common.db import connect
from services.common.kafka import ensure_topics, publish_flow_events
from services.common.migrate import MigrationChanged, migrate
from services.common.settings import CommonSettings
from services.executor.adapters.flows import FlowRegistry

log = logging.getLogger("flowtrail.launcher")


@dataclass(frozen=True)
class BootstrapResult:
    api_key: str
    tenant_id: str
    flow_ids: list[str] = field(default_factory=list)


def _same_definition(a: FlowDefinition, b: FlowDefinition) -> bool:
    return a.model_dump(exclude={"version"}) == b.model_dump(exclude={"version"})


def _opened(flow: FlowDefinition, keyring: Keyring) -> FlowDefinition:
    try:
        return open_flow(flow, keyring)
    except ValueError:
        return flow  # sealed with a key this state folder no longer has: publish the demo again


async def publish_if_changed(settings: CommonSettings, flows: list[FlowDefinition]) -> list[int]:
    """Publish each flow as a new version unless its latest version is already this definition."""
    topics = Topics(settings.topic_prefix)
    keyring = Keyring.from_settings(settings)  # credentials in step inputs go to the topic encrypted
    registry = FlowRegistry(settings.kafka_bootstrap, topics.flows)
    await registry.start()
    try:
        events, versions = [], []
        for flow in flows:
            latest = registry.get(flow.tenant_id, flow.id, None)
            if latest is not None and _same_definition(_opened(latest, keyring), flow):
                versions.append(latest.version)
                continue
            version = (latest.version + 1) if latest else 1
            published = seal_flow(flow, keyring).model_copy(update={"version": version})
            events.append(
                FlowVersionPublished(tenant_id=flow.tenant_id, flow_id=flow.id, flow_version=version, flow=published)
            )
            versions.append(version)
        if events:
            await publish_flow_events(settings.kafka_bootstrap, topics, events)
        return versions
    finally:
        await registry.stop()


async def bootstrap(settings: CommonSettings) -> BootstrapResult:
    created = await ensure_topics(settings.kafka_bootstrap, Topics(settings.topic_prefix), settings.partitions)
    if created:
        log.info("created topics %s", ", ".join(created))
    conn = await connect(settings.database_url, settings.database_schema)
    try:
        try:
            await migrate(conn, settings.database_schema)
        except MigrationChanged as exc:
            raise LauncherError(str(exc)) from None
        await ensure_tenant(conn, DEMO_TENANT, "Demo tenant")
        # Keep the key of the previous `up` when it still works, so scripts holding it go on working.
        key_file = settings.state_dir / "api_key"
        api_key = key_file.read_text().strip() if key_file.exists() else ""
        if not api_key or await verify_api_key(conn, api_key) is None:
            _, api_key = await create_api_key(conn, DEMO_TENANT, name="bootstrap key")
    finally:
        await conn.close()
    flows = demo_flows()
    await publish_if_changed(settings, flows)
    return BootstrapResult(api_key=api_key, tenant_id=DEMO_TENANT, flow_ids=[f.id for f in flows])
