"""Connectors (docs/api-contract.md): register, list with health and the flows using each, get, delete, and verify.

A connector is registered under the name steps use (`connector`, `source.connector`, `destination.connector`).
Its status comes from connector_health, which the projector derives from the ledger: degraded by a step's
AUTH error, ok again once a later step using it succeeds (services/projector/connectors.py). `verify` makes a
real check now (HTTP GET, PostgreSQL `SELECT 1`, Kafka metadata) and reports it; it does not change the
status, which stays a function of the ledger. Credentials are masked in every answer.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import urljoin, urlsplit

import asyncpg
import httpx
from aiokafka import errors as kerr
from aiokafka.admin import AIOKafkaAdminClient
from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.events import ErrorCategory, ErrorInfo
from schemas.flows import mask_secrets, mask_text
from services.api.models.connectors import Connector, ConnectorCheck, Connectors
from services.api.models.flows import FlowsMeta
from services.api.routes import Admin, Reader, found
from services.api.routes.flows import connectors as named_connectors
from services.common.auth import Principal
from services.common.contract import AnyCase
from services.common.crypto import SecretsKeyError, decrypt_text, encrypt_inline, inline_context, plaintexts, redact
from services.common.cursor import CursorCodec
from services.common.failures import StepError, classify_kafka, classify_sqlstate, classify_status, masked_message
from services.common.http import ApiError
from services.common.netguard import (
    BlockedAddress,
    KafkaGuard,
    UnresolvableHost,
    check_host,
    check_url,
    guard_dsn,
    guarded_client,
    kafka_bootstrap,
)
from services.common.secretstore import keyring_of, read_secrets
from services.common.templating import TemplateError, render, secret_names

router = APIRouter()

_BY_NAME: CursorCodec[str] = CursorCodec(str)  # connectors are listed by name
KINDS = ("http", "postgresql", "kafka")
STATUSES = ("ok", "degraded")
_SCHEMES = {"http": ("http", "https"), "postgresql": ("postgresql", "postgres"), "kafka": ("kafka",)}


class ConnectorConfig(BaseModel):
    """`url` for http (http/https) and kafka (`kafka://host:port[,host:port]`), `dsn` for postgresql."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, max_length=2000)
    dsn: str | None = Field(default=None, max_length=2000)
    # http only: what verify GETs (resolved against `url`; the URL itself when absent), and headers it sends.
    health_path: str | None = Field(default=None, max_length=500)
    headers: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = Field(default=5.0, gt=0, le=30)


class NewConnector(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:\-]*$")
    kind: Literal["http", "postgresql", "kafka"]
    config: ConnectorConfig

    @model_validator(mode="after")
    def _fits_kind(self) -> NewConnector:
        c = self.config
        field = "dsn" if self.kind == "postgresql" else "url"
        other = "url" if field == "dsn" else "dsn"
        value = getattr(c, field)
        if not value:
            raise ValueError(f"a {self.kind} connector needs config.{field}")
        if getattr(c, other) is not None:
            raise ValueError(f"a {self.kind} connector takes config.{field}, not config.{other}")
        parts = urlsplit(value)
        if parts.scheme not in _SCHEMES[self.kind] or not parts.netloc.rpartition("@")[2]:
            schemes = " or ".join(f"{s}://" for s in _SCHEMES[self.kind])
            raise ValueError(f"config.{field} must be a {schemes} URL with a host")
        if self.kind != "http" and (c.health_path is not None or c.headers):
            raise ValueError("config.health_path and config.headers apply to http connectors only")
        return self


# ---------------------------------------------------------------- what a connector looks like to a caller

_COLUMNS = "c.id, c.name, c.kind, c.config, c.last_verified_at, c.last_verify, c.created_at, c.updated_at"
_HEALTH = ("degraded_since", "last_error", "last_auth_failure_at", "last_failure_run_id", "last_failure_step",
           "last_success_at", "last_success_run_id")  # fmt: skip
_SELECT = f"""
SELECT {_COLUMNS}, coalesce(h.status, 'ok') AS status, {", ".join("h." + c for c in _HEALTH)}
FROM connectors c
LEFT JOIN connector_health h ON h.tenant_id = c.tenant_id AND h.connector = c.name
"""


def _view(row: asyncpg.Record, used_by: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "kind": row["kind"],
        "config": mask_secrets(row["config"]),
        "status": row["status"],
        "health": {
            "degraded_since": row["degraded_since"],
            "last_error": mask_secrets(row["last_error"]),
            "last_auth_failure_at": row["last_auth_failure_at"],
            "last_failure": {"run_id": row["last_failure_run_id"], "step": row["last_failure_step"]}
            if row["last_failure_run_id"] else None,
            "last_success_at": row["last_success_at"],
            "last_success_run_id": row["last_success_run_id"],
        },
        "flows": used_by.get(row["name"], []),
        "last_verified_at": row["last_verified_at"],
        "last_verify": row["last_verify"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }  # fmt: skip


async def _flows_using(pool: asyncpg.Pool, principal: Principal) -> dict[str, list[dict[str, Any]]]:
    """Connector name → the flows (of the key's environment, latest version) whose steps name it."""
    rows = await pool.fetch(
        "SELECT f.id, f.name, v.definition FROM flows f JOIN flow_versions v ON v.tenant_id = f.tenant_id "
        "AND v.flow_id = f.id AND v.version = f.latest_version WHERE f.tenant_id = $1 AND f.environment = $2 "
        "ORDER BY f.id",
        principal.tenant_id, principal.environment,
    )  # fmt: skip
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        for c in named_connectors(r["definition"] or {}):
            out.setdefault(c["name"], []).append({"id": r["id"], "name": r["name"], "steps": c["used_by"]})
    return out


async def _row_or_404(pool: asyncpg.Pool, principal: Principal, connector_id: str) -> asyncpg.Record:
    row = await pool.fetchrow(f"{_SELECT} WHERE c.tenant_id = $1 AND c.id = $2", principal.tenant_id, connector_id)
    return found(row, "connector", connector_id)


# ---------------------------------------------------------------- credentials at rest (docs/secrets.md)


def _sealed(request: Request, principal: Principal, config: ConnectorConfig) -> dict[str, Any]:
    """The config as stored: what answers show as `***` (the DSN's password, secret headers) encrypted."""
    keyring = keyring_of(request.app.state, request.app.state.settings)
    return encrypt_inline(config.model_dump(exclude_none=True), keyring, inline_context(principal.tenant_id))


async def _opened(request: Request, principal: Principal, stored: Any) -> tuple[ConnectorConfig, set[str]]:
    """The config to use now: its credentials decrypted and `{{ secrets.NAME }}` references read from the store
    (the key's environment), and the values to keep out of the answer."""
    keyring = keyring_of(request.app.state, request.app.state.settings)
    names = secret_names(stored)
    values = await read_secrets(request.app.state.pool, keyring, principal.tenant_id, principal.environment, names)
    missing = sorted(names - values.keys())
    if missing:
        raise ApiError(422, "secret_not_found", f"the connector's config references secret(s) {', '.join(missing)}, "
                       f"which the tenant's {principal.environment} secrets do not hold")  # fmt: skip
    opened: list[Any] = []
    context = inline_context(principal.tenant_id)
    try:
        config = render(stored, {"secrets": values}, lambda text: decrypt_text(text, keyring, context, opened))
    except (TemplateError, SecretsKeyError) as exc:
        raise ApiError(422, "validation_error", f"the connector's config cannot be used: {exc}") from None
    return ConnectorConfig.model_validate(config), plaintexts([*values.values(), *opened])


# ---------------------------------------------------------------- endpoints


@router.post("/v1/connectors", status_code=201, response_model_exclude_unset=True)
async def create_connector(body: NewConnector, request: Request, principal: Admin) -> Connector:
    """Names are unique per tenant (409). URLs and DSNs on private networks are refused unless the deployment
    allows them (FLOWTRAIL_API_CONNECTOR_ALLOW_PRIVATE_NETWORKS)."""
    try:
        await _guard(body.kind, body.config, request.app.state.settings.connector_allow_private_networks)
    except (BlockedAddress, OSError, ValueError, asyncpg.InterfaceError) as exc:
        field = "dsn" if body.kind == "postgresql" else "url"
        raise ApiError(422, "validation_error", f"config.{field}: {mask_text(str(exc))}") from None
    pool = request.app.state.pool
    connector_id = "con_" + secrets.token_hex(8)
    try:
        await pool.execute(
            "INSERT INTO connectors (tenant_id, id, name, kind, config) VALUES ($1, $2, $3, $4, $5)",
            principal.tenant_id, connector_id, body.name, body.kind, _sealed(request, principal, body.config),
        )  # fmt: skip
    except asyncpg.UniqueViolationError:
        raise ApiError(409, "conflict", f"a connector named {body.name!r} already exists") from None
    row = await _row_or_404(pool, principal, connector_id)
    return Connector(**_view(row, await _flows_using(pool, principal)))


@router.get("/v1/connectors", response_model_exclude_unset=True)
async def list_connectors(
    request: Request,
    principal: Reader,
    status: Annotated[Literal["ok", "degraded"] | None, Query(), AnyCase] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    cursor: str | None = None,
) -> Connectors:
    """By name; each with its status and health, and the flows whose steps use it. `meta.total` counts every
    match of the filter."""
    pool = request.app.state.pool
    where = "WHERE c.tenant_id = $1 AND ($2::text IS NULL OR coalesce(h.status, 'ok') = $2)"
    total = await pool.fetchval(
        "SELECT count(*) FROM connectors c LEFT JOIN connector_health h ON h.tenant_id = c.tenant_id "
        f"AND h.connector = c.name {where}",
        principal.tenant_id, status,
    )  # fmt: skip
    after = _BY_NAME.decode(cursor) if cursor else None
    rows = await pool.fetch(
        f"{_SELECT} {where} AND ($3::text IS NULL OR c.name > $3) ORDER BY c.name LIMIT $4",
        principal.tenant_id, status, after, limit + 1,
    )  # fmt: skip
    more = len(rows) > limit
    rows = rows[:limit]
    used_by = await _flows_using(pool, principal)
    return Connectors(
        data=[Connector(**_view(r, used_by)) for r in rows],
        next_cursor=_BY_NAME.encode(rows[-1]["name"]) if more and rows else None,
        meta=FlowsMeta(total=total, has_more=more),
    )


@router.get("/v1/connectors/{connector_id}", response_model_exclude_unset=True)
async def get_connector(connector_id: str, request: Request, principal: Reader) -> Connector:
    pool = request.app.state.pool
    row = await _row_or_404(pool, principal, connector_id)
    return Connector(**_view(row, await _flows_using(pool, principal)))


@router.delete("/v1/connectors/{connector_id}", status_code=204, response_class=Response)
async def delete_connector(connector_id: str, request: Request, principal: Admin) -> None:
    """Steps naming it keep running (the executor has its own connector settings); its health history stays."""
    deleted = await request.app.state.pool.fetchval(
        "DELETE FROM connectors WHERE tenant_id = $1 AND id = $2 RETURNING id", principal.tenant_id, connector_id
    )
    found(deleted, "connector", connector_id)


@router.post("/v1/connectors/{connector_id}/verify", response_model_exclude_unset=True)
async def verify_connector(connector_id: str, request: Request, principal: Admin) -> ConnectorCheck:
    """A real check now, within the connector's `timeout_s`: `{"ok": true, "latency_ms", "detail"}` or
    `{"ok": false, "latency_ms", "error": {category, message}}` with errors classified as runs classify them
    (401/403 or a refused login → AUTH, refused connection or timeout → TRANSIENT)."""
    pool = request.app.state.pool
    row = await _row_or_404(pool, principal, connector_id)
    config, used = await _opened(request, principal, row["config"])
    allow_private = request.app.state.settings.connector_allow_private_networks
    began = time.perf_counter()
    try:
        async with asyncio.timeout(config.timeout_s):
            detail = await _CHECKS[row["kind"]](config, allow_private)
        result: dict[str, Any] = {"ok": True, "detail": detail}
    except TimeoutError:
        error = ErrorInfo(category=ErrorCategory.TRANSIENT, code="timeout",
                          message=f"no answer within {config.timeout_s:g} s")  # fmt: skip
        result = {"ok": False, "error": error.model_dump(mode="json", exclude_none=True)}
    except StepError as exc:
        result = {"ok": False, "error": exc.error.model_dump(mode="json", exclude_none=True)}
    checked_at = datetime.now(UTC)
    result = {"connector_id": connector_id, **redact(mask_secrets(result), used), "latency_ms": _ms(began),
              "checked_at": checked_at}  # fmt: skip
    await pool.execute(
        "UPDATE connectors SET last_verified_at = $3, last_verify = $4 WHERE tenant_id = $1 AND id = $2",
        principal.tenant_id, connector_id, checked_at, result,
    )  # fmt: skip
    return ConnectorCheck(**result)


def _ms(began: float) -> float:
    return round((time.perf_counter() - began) * 1000, 2)


# ---------------------------------------------------------------- the private-address guard and the checks


async def _guard(kind: str, config: ConnectorConfig, allow_private: bool) -> None:
    """The early check at registration, for a clear 422: http(s) URLs, the DSN's hosts as asyncpg reads them,
    each kafka broker. Not the defence: verify connects through the connection-level guard."""
    if kind == "http":
        assert config.url is not None
        await check_url(config.url, allow_private=allow_private)
        if config.health_path is not None:
            await check_url(urljoin(config.url, config.health_path), allow_private=allow_private)
    elif kind == "postgresql":
        assert config.dsn is not None
        await guard_dsn(config.dsn, allow_private=allow_private)
    elif not allow_private:
        for host, port in _brokers(config):
            await check_host(host, port)


def _brokers(config: ConnectorConfig) -> list[tuple[str, int]]:
    assert config.url is not None
    out = []
    for item in config.url.removeprefix("kafka://").split(","):
        parts = urlsplit(f"//{item.strip()}")
        if parts.hostname:
            out.append((parts.hostname, parts.port or 9092))
    return out


@contextmanager
def _refusals() -> Iterator[None]:
    """The guard's refusals as verify reports them: checked again at verify time, where it connects."""
    try:
        yield
    except BlockedAddress as exc:
        raise StepError(ErrorCategory.VALIDATION, mask_text(str(exc)), code="blocked_address") from None
    except UnresolvableHost as exc:
        raise StepError(ErrorCategory.TRANSIENT, masked_message(exc), code="unresolvable_host") from None


async def _check_http(config: ConnectorConfig, allow_private: bool) -> dict[str, Any]:
    assert config.url is not None
    target = urljoin(config.url, config.health_path) if config.health_path else config.url
    try:
        with _refusals():
            await check_url(target, allow_private=True)  # scheme and host; the address where it connects
            async with guarded_client(allow_private, timeout=config.timeout_s, follow_redirects=False) as client:
                response = await client.get(target, headers=config.headers)
    except httpx.TimeoutException as exc:
        raise StepError(ErrorCategory.TRANSIENT, masked_message(exc), code="timeout") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise StepError(ErrorCategory.TRANSIENT, masked_message(exc), code="network") from None
    code = response.status_code
    if code >= 400:
        raise StepError(classify_status(code), f"GET {mask_text(target)} answered {code} {response.reason_phrase}",
                        code=f"http_{code}", status_code=code)  # fmt: skip
    return {"url": mask_text(target), "status_code": code}


async def _check_postgresql(config: ConnectorConfig, allow_private: bool) -> dict[str, Any]:
    assert config.dsn is not None
    try:
        with _refusals():
            pinned = await guard_dsn(config.dsn, allow_private=allow_private)  # connect to what was checked
        conn = await asyncpg.connect(config.dsn, timeout=config.timeout_s, **pinned)
        try:
            await conn.fetchval("SELECT 1")
            version = await conn.fetchval("SHOW server_version")
        finally:
            await conn.close(timeout=config.timeout_s)
    except asyncpg.PostgresError as exc:
        raise StepError(classify_sqlstate(exc.sqlstate), masked_message(exc), code=exc.sqlstate) from None
    except (asyncpg.ClientConfigurationError, asyncpg.InternalClientError, ValueError) as exc:
        raise StepError(ErrorCategory.VALIDATION, masked_message(exc), code="invalid_dsn") from None
    except TimeoutError as exc:
        raise StepError(ErrorCategory.TRANSIENT, masked_message(exc), code="timeout") from None
    except (OSError, asyncpg.InterfaceError) as exc:
        # Refused, unreachable or reset: the database may be back later.
        raise StepError(ErrorCategory.TRANSIENT, masked_message(exc), code="network") from None
    return {"server_version": version}


async def _check_kafka(config: ConnectorConfig, allow_private: bool) -> dict[str, Any]:
    brokers = _brokers(config)
    guard = None if allow_private else KafkaGuard()
    with _refusals():
        # Bootstrap through the checked addresses; every advertised broker is checked before it is dialled.
        servers = ",".join(f"{h}:{p}" for h, p in brokers) if guard is None else await kafka_bootstrap(brokers)
    admin = AIOKafkaAdminClient(bootstrap_servers=servers, client_id="flowtrail-api-verify",
                                request_timeout_ms=int(config.timeout_s * 1000))  # fmt: skip
    if guard is not None:
        guard.install(admin._client)
    try:
        await admin.start()
        if guard is not None:
            with _refusals():
                await guard.check_cluster(admin._client)
        cluster = await admin.describe_cluster()
    except (kerr.KafkaError, OSError) as exc:
        if guard is not None and guard.refused is not None:
            with _refusals():
                raise guard.refused from None
        raise StepError(classify_kafka(exc), masked_message(exc), code="kafka") from None
    finally:
        await admin.close()
    return {"cluster_id": cluster.get("cluster_id"), "brokers": len(cluster.get("brokers") or ())}


_CHECKS = {"http": _check_http, "postgresql": _check_postgresql, "kafka": _check_kafka}
