"""`redis_get` and `redis_set` on a `redis://` connector (docs/flows.md#redis_get-and-redis_set): a small pool per
connection, the tenant's connectors guarded at every connection (docs/network-guard.md), failures classified."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis import exceptions as rerr
from redis.asyncio.connection import Connection, ConnectionPool, SSLConnection, parse_url

from schemas.events import ErrorCategory
from schemas.flows import RedisGetInput, RedisSetInput, mask_text
from services.common.failures import masked_message
from services.common.netguard import BlockedAddress, UnresolvableHost, checked_addresses
from services.executor.adapters.actions_base import StepCall, StepError, cap_output, parse_input
from services.executor.adapters.connectors import ConnectorRegistry, as_registry

SCHEMES = ("redis", "rediss")
CONNECT_TIMEOUT_S = 10.0


class _Pinned:
    """A redis-py connection that resolves its host once, refuses it when any address is blocked and dials a checked
    address; TLS keeps the host's name for SNI and the certificate check (services.common.netguard)."""

    host: str
    port: int
    socket_connect_timeout: float | None
    _address: str | None = None

    async def _connect(self) -> None:
        async with asyncio.timeout(self.socket_connect_timeout):
            self._address = (await checked_addresses(self.host, self.port))[0]
        await super()._connect()  # type: ignore[misc]

    def _connection_arguments(self) -> Mapping[str, Any]:
        arguments = dict(super()._connection_arguments())  # type: ignore[misc]
        if self._address is not None:
            arguments["host"] = self._address
            if arguments.get("ssl") is not None:
                arguments["server_hostname"] = self.host
        return arguments


class GuardedConnection(_Pinned, Connection):
    pass


class GuardedSSLConnection(_Pinned, SSLConnection):
    pass


class RedisActions:
    """One client per connection URL (and password), kept for the next step that uses it."""

    def __init__(self, *, connectors: ConnectorRegistry | Mapping[str, str], allow_private: bool,
                 max_output_bytes: int, max_clients: int = 16) -> None:  # fmt: skip
        self.connectors = as_registry(connectors)
        self.allow_private = allow_private
        self.max_bytes = max_output_bytes
        self.max_clients = max_clients
        self._clients: OrderedDict[tuple[str, str | None, bool], aioredis.Redis] = OrderedDict()

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), OrderedDict()
        for client in clients:
            await client.aclose()

    async def get(self, call: StepCall) -> dict[str, Any]:
        spec = parse_input(RedisGetInput, call.input, "redis_get")
        shown: dict[str, Any] = {"connector": spec.connector, "key": spec.key}
        client = await self._client(call, spec.connector, spec.password, shown)
        async with self._errors(shown):
            async with client.pipeline(transaction=True) as pipe:
                pipe.get(spec.key)
                pipe.pttl(spec.key)
                raw, ttl_ms = await pipe.execute()
        if raw is None:
            return {**shown, "found": False, "value": None, "ttl_s": None}
        return {**shown, "found": True, "value": self._decode(raw, spec.value_format, shown),
                "ttl_s": ttl_ms / 1000 if ttl_ms >= 0 else None}  # fmt: skip

    async def set(self, call: StepCall) -> dict[str, Any]:
        spec = parse_input(RedisSetInput, call.input, "redis_set")
        raw = spec.value.encode() if isinstance(spec.value, str) else orjson.dumps(spec.value)
        shown: dict[str, Any] = {"connector": spec.connector, "key": spec.key, "value": cap_output(spec.value, 4096),
                                 "ttl_s": spec.ttl_s, "condition": spec.condition}  # fmt: skip
        if len(raw) > self.max_bytes:
            raise StepError(ErrorCategory.VALIDATION, f"redis_set value is {len(raw)} bytes, more than the "
                            f"{self.max_bytes} a step may write", code="value_too_large", output=shown)  # fmt: skip
        client = await self._client(call, spec.connector, spec.password, shown)
        px = max(1, round(spec.ttl_s * 1000)) if spec.ttl_s is not None else None
        async with self._errors(shown):
            written = await client.set(spec.key, raw, px=px, nx=spec.condition == "nx", xx=spec.condition == "xx")
        return {**shown, "written": bool(written)}

    def _decode(self, raw: bytes, value_format: str, shown: dict[str, Any]) -> Any:
        try:
            text = raw.decode()
            return orjson.loads(text) if value_format == "json" else text
        except UnicodeDecodeError:
            problem, code = "is not UTF-8 text", "not_text"
        except orjson.JSONDecodeError:
            problem, code = "is not JSON (read it with value_format text)", "not_json"
        raise StepError(ErrorCategory.VALIDATION, f"the value of {shown['key']!r} {problem}", code=code,
                        output={**shown, "size_bytes": len(raw)})  # fmt: skip

    async def _client(self, call: StepCall, name: str, password: str | None,
                      shown: dict[str, Any]) -> aioredis.Redis:  # fmt: skip
        connector = await self.connectors.resolve(call.tenant_id, call.environment, name, SCHEMES, "redis")
        shown["connection"] = mask_text(connector.url)
        # The operator's own connectors are trusted, private addresses included; a tenant's are guarded.
        guarded = not (connector.trusted or self.allow_private)
        key = (connector.url, password, guarded)
        client = self._clients.get(key)
        if client is not None:
            self._clients.move_to_end(key)
            return client
        try:
            options: dict[str, Any] = dict(parse_url(connector.url))
        except ValueError as exc:
            raise StepError(ErrorCategory.VALIDATION, masked_message(exc), code="invalid_url", output=shown) from exc
        tls = options.pop("connection_class", Connection) is SSLConnection
        if password is not None:
            options["password"] = password
        if guarded:
            options["connection_class"] = GuardedSSLConnection if tls else GuardedConnection
        elif tls:
            options["connection_class"] = SSLConnection
        options.setdefault("socket_connect_timeout", CONNECT_TIMEOUT_S)
        pool = ConnectionPool(max_connections=8, **options)
        client = aioredis.Redis(connection_pool=pool)
        self._clients[key] = client
        while len(self._clients) > self.max_clients:
            _, oldest = self._clients.popitem(last=False)
            task = asyncio.get_running_loop().create_task(oldest.aclose())
            task.add_done_callback(lambda t: t.exception())
        return client

    def _errors(self, shown: dict[str, Any]) -> _Classified:
        return _Classified(shown)


class _Classified:
    """Redis failures as step errors: auth refused is AUTH, a key of another type or a refused command VALIDATION,
    an unreachable or busy server TRANSIENT, a blocked address VALIDATION (docs/network-guard.md)."""

    def __init__(self, shown: dict[str, Any]) -> None:
        self.shown = shown

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            return
        error = classify_redis(exc)
        if error is None:
            return
        category, code = error
        message = masked_message(exc) or type(exc).__name__
        raise StepError(category, f"redis: {message}", code=code, output=self.shown) from exc


def classify_redis(exc: BaseException) -> tuple[ErrorCategory, str] | None:
    """(category, code) of a redis-py or guard failure; None for anything else (an executor bug). redis-py wraps
    what its connect raises in a ConnectionError: the guard's refusal is found in the chain of causes."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, BlockedAddress):
            return ErrorCategory.VALIDATION, "blocked_address"
        if isinstance(cause, UnresolvableHost):
            return ErrorCategory.TRANSIENT, "unresolvable_host"
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, rerr.AuthenticationError | rerr.AuthorizationError | rerr.NoPermissionError):
        return ErrorCategory.AUTH, "auth"
    # The server's error code leads its message; in a pipeline, after "Command # n (…) of pipeline caused error: ".
    text = str(exc)
    if isinstance(exc, rerr.ResponseError) and any(c in text for c in ("NOAUTH ", "WRONGPASS ", "NOPERM ")):
        return ErrorCategory.AUTH, "auth"
    if isinstance(exc, rerr.ResponseError) and "WRONGTYPE " in text:
        return ErrorCategory.VALIDATION, "wrong_type"
    if isinstance(exc, rerr.BusyLoadingError | rerr.TryAgainError | rerr.ClusterDownError):
        return ErrorCategory.TRANSIENT, "busy"
    if isinstance(exc, rerr.ConnectionError | rerr.TimeoutError | OSError | TimeoutError):
        return ErrorCategory.TRANSIENT, "network"
    if isinstance(exc, rerr.ReadOnlyError):
        return ErrorCategory.TRANSIENT, "read_only"
    if isinstance(exc, rerr.ResponseError | rerr.DataError):
        return ErrorCategory.VALIDATION, "redis_error"
    return None
