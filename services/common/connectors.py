"""The connectors a step or a trigger may name: one registry fed by two sources (docs/network-guard.md,
docs/secrets.md).

1. The tenant's own connectors, registered with `POST /v1/connectors` (the `connectors` control-plane table the API
   owns, not a read model): looked up by id or name when needed, cached for a few seconds, opened like the API's
   verify opens them — credentials decrypted, `{{ secrets.NAME }}` references read from the store. They are
   user-supplied, so their addresses are guarded like a flow's own URL (unless the deployment allows private
   networks).
2. Deployment-wide connectors from the service's own setting (`FLOWTRAIL_EXECUTOR_CONNECTORS`,
   `FLOWTRAIL_INGEST_CONNECTORS`: name → URL), configured by the operator and trusted, private addresses included.

A tenant's connector shadows a deployment-wide one of the same name. The executor's steps and ingest's kafka
triggers both resolve through here (services/executor/adapters/connectors.py, services/ingest/adapters/).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from schemas.events import ErrorCategory
from services.common.crypto import SecretsKeyError, decrypt_text, inline_context
from services.common.failures import StepError
from services.common.netguard import kafka_bootstrap
from services.common.secretstore import SecretReader
from services.common.templating import TemplateError, render, secret_names

_KIND_OF_SCHEME = {"http": "http", "https": "http", "postgresql": "postgresql", "postgres": "postgresql",
                   "kafka": "kafka"}  # fmt: skip
_FIND = """
SELECT id, name, kind, config FROM connectors WHERE tenant_id = $1 AND (name = $2 OR id = $2)
ORDER BY (name = $2) DESC LIMIT 1
"""


@dataclass(frozen=True, slots=True)
class Resolved:
    """A connector ready to use: its URL (or DSN), headers (http), and whether the operator configured it (trusted:
    not guarded). Outputs show a connection masked (`mask_text`), as for a flow's own DSN."""

    url: str
    trusted: bool
    headers: dict[str, str] = field(default_factory=dict)


class ConnectorRegistry:
    def __init__(
        self, configured: Mapping[str, str], secrets: SecretReader | None, *, ttl_s: float = 5.0,
        setting: str = "FLOWTRAIL_EXECUTOR_CONNECTORS",
    ) -> None:  # fmt: skip
        self.configured = dict(configured)
        self.secrets = secrets
        self.ttl_s = ttl_s
        self.setting = setting  # where the operator's connectors are configured, named in "unknown connector"
        self._cache: dict[tuple[str, str], tuple[float, asyncpg.Record | None]] = {}

    async def resolve(
        self, tenant_id: str, environment: str, name: str, schemes: tuple[str, ...], kind: str
    ) -> Resolved:
        """The connector `name` of this kind for the tenant; an unknown one is a VALIDATION error naming the known."""
        row = await self._registered(tenant_id, name)
        wanted = {_KIND_OF_SCHEME.get(s, s) for s in schemes}
        if row is not None and row["kind"] in wanted:
            return await self._open(tenant_id, environment, row)
        url = self.configured.get(name)
        if url is not None and url.startswith(tuple(f"{s}://" for s in schemes)):
            return Resolved(url, trusted=True)
        known = sorted(n for n, u in self.configured.items() if u.startswith(tuple(f"{s}://" for s in schemes)))
        listed = ", ".join(known) or "none"
        raise StepError(
            ErrorCategory.VALIDATION,
            f"no {kind} connector named {name!r}: register one with POST /v1/connectors (deployment-wide: {listed}, "
            f"{self.setting})",
            code="unknown_connector",
        )

    async def _registered(self, tenant_id: str, name: str) -> asyncpg.Record | None:
        if self.secrets is None or not tenant_id:
            return None
        key = (tenant_id, name)
        hit = self._cache.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        try:
            pool = await self.secrets.pool()
            row = await pool.fetchrow(_FIND, tenant_id, name)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StepError(ErrorCategory.TRANSIENT, f"the connector registry is unreachable ({type(exc).__name__})",
                            code="connectors_unavailable") from None  # fmt: skip
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key] = (time.monotonic() + self.ttl_s, row)
        return row

    async def _open(self, tenant_id: str, environment: str, row: asyncpg.Record) -> Resolved:
        assert self.secrets is not None
        stored: Any = row["config"]
        names = secret_names(stored)
        try:
            values = await self.secrets.read(tenant_id, environment, names) if names else {}
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StepError(ErrorCategory.TRANSIENT, f"the secrets store is unreachable ({type(exc).__name__})",
                            code="secrets_unavailable") from None  # fmt: skip
        missing = sorted(names - values.keys())
        if missing:
            raise StepError(ErrorCategory.VALIDATION, f"connector {row['name']!r} references secret(s) "
                            f"{', '.join(missing)}, which the tenant's {environment} secrets do not hold",
                            code="secret_not_found")  # fmt: skip
        opened: list[Any] = []
        keyring, context = self.secrets.keyring, inline_context(tenant_id)
        try:
            config = render(stored, {"secrets": values}, lambda text: decrypt_text(text, keyring, context, opened))
        except (TemplateError, SecretsKeyError) as exc:
            raise StepError(ErrorCategory.VALIDATION, f"connector {row['name']!r} cannot be used: {exc}",
                            code="connector_unusable") from None  # fmt: skip
        url = str(config.get("dsn") or config.get("url") or "")
        headers = {str(k): str(v) for k, v in (config.get("headers") or {}).items()}
        return Resolved(url, trusted=False, headers=headers)


def as_registry(connectors: ConnectorRegistry | Mapping[str, str]) -> ConnectorRegistry:
    """A registry as is; a plain name → URL mapping as the operator's connectors alone (runners built on their own)."""
    return connectors if isinstance(connectors, ConnectorRegistry) else ConnectorRegistry(connectors, None)


@dataclass(frozen=True, slots=True)
class KafkaCluster:
    """Where a kafka connector's clients connect: `servers` for aiokafka's `bootstrap_servers`; `guarded` when every
    broker the cluster advertises must be checked before it is dialled (`netguard.KafkaGuard`)."""

    servers: str
    guarded: bool


async def kafka_cluster(resolved: Resolved, *, allow_private: bool) -> KafkaCluster:
    """A kafka connector's bootstrap servers. A tenant's own connector is guarded like a flow's URL: its bootstrap
    servers resolved once and checked (the client dials the checked addresses), and its clients check every
    advertised broker; the operator's are trusted. Raises `BlockedAddress` / `UnresolvableHost`.

    A kafka connector is its bootstrap servers alone (`kafka://host:port[,host:port]`): no SASL or TLS settings."""
    servers = resolved.url.removeprefix("kafka://")
    if resolved.trusted or allow_private:
        return KafkaCluster(servers, guarded=False)
    return KafkaCluster(await kafka_bootstrap(kafka_hosts(servers)), guarded=True)


def kafka_hosts(servers: str) -> list[tuple[str, int]]:
    """`host:port,host:port` (IPv6 in brackets) as (host, port) pairs; 9092 when a port is missing."""
    out = []
    for item in filter(None, (x.strip() for x in servers.split(","))):
        parts = urlsplit(f"//{item}")
        out.append((parts.hostname or item, parts.port or 9092))
    return out
