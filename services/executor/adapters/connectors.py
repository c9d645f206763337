"""The connectors a step may name: one registry fed by two sources.

1. The tenant's own connectors, registered with `POST /v1/connectors` (the `connectors` control-plane table the API
   owns, not a read model): looked up by id or name when a step needs one, cached for a few seconds, opened like the
   API's verify opens them — credentials decrypted, `{{ secrets.NAME }}` references read from the store. They are
   user-supplied, so their addresses are guarded like a flow's own URL (unless the deployment allows private
   networks).
2. Deployment-wide connectors from `FLOWTRAIL_EXECUTOR_CONNECTORS` (name → URL), configured by the operator and
   trusted, private addresses included.

A tenant's connector shadows a deployment-wide one of the same name.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from schemas.events import ErrorCategory
from services.common.crypto import SecretsKeyError, decrypt_text, inline_context
from services.common.secretstore import SecretReader
from services.common.templating import TemplateError, render, secret_names
from services.executor.adapters.actions_base import StepError

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
    def __init__(self, configured: Mapping[str, str], secrets: SecretReader | None, *, ttl_s: float = 5.0) -> None:
        self.configured = dict(configured)
        self.secrets = secrets
        self.ttl_s = ttl_s
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
            "FLOWTRAIL_EXECUTOR_CONNECTORS)",
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
