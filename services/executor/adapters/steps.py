"""Step runners: the only executor code that touches the outside world; dispatches each action to its runner."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from schemas.events import ErrorCategory, ErrorInfo
from schemas.flows import StepAction, StepDefinition, contains_mask, mask_secrets, mask_text
from schemas.status import StepStatus
from services.common.crypto import contains_ciphertext, redact
from services.common.failures import classify_status
from services.common.netguard import BlockedAddress, UnresolvableHost, check_url, guarded_client
from services.common.secretstore import SecretReader
from services.common.templating import TemplateError, masked_secrets, render, secret_names, with_secrets
from services.executor.adapters.actions_base import StepCall, StepError, StepOutcome, cap_output
from services.executor.adapters.actions_db import DatabaseActions
from services.executor.adapters.actions_kafka import KafkaActions
from services.executor.adapters.actions_python import PythonActions
from services.executor.adapters.actions_sync import SyncRecordsActions
from services.executor.adapters.connectors import ConnectorRegistry
from services.executor.adapters.secret_inputs import PendingInput, resolve, scrub
from services.executor.fold import RunState
from services.executor.settings import ExecutorSettings

if TYPE_CHECKING:
    from services.executor.adapters.actions_grpc import GrpcActions
    from services.executor.adapters.actions_redis import RedisActions

__all__ = ["PendingInput", "StepCall", "StepError", "StepOutcome", "StepRunners", "classify_status", "runner_input"]

log = logging.getLogger(__name__)


def runner_input(state: RunState, definition: StepDefinition) -> Any:
    """The input a step's runner gets: the recorded one, or when the ledger's copy hides secrets (`***`) the
    step's input rendered again from the same context `decide` rendered it from, secrets included. A step whose
    input references the secrets store or holds inline ciphertexts gets a PendingInput, rendered by the runner
    right before the call (a subflow or human_input step gets them masked: their input is recorded again)."""
    step = state.steps[definition.name]
    if not contains_mask(step.input):
        return step.input
    context = state.context()
    steps = dict(context["steps"])
    if step.attempt == 1:
        steps.pop(definition.name, None)  # decide rendered the first attempt before the step existed
    else:
        steps[definition.name] = {"output": None, "status": StepStatus.RETRYING.value}
    context = {**context, "steps": steps}
    template = dict(definition.input)
    names = secret_names(template)
    try:
        rendered = render(template, with_secrets(context, masked_secrets(template)))
    except TemplateError:
        return step.input
    extra: dict[str, Any] = {}
    if definition.action == StepAction.SYNC_RECORDS and isinstance(step.input, dict):
        # decide added the run's window and the keys to retry after rendering: not in the definition.
        extra = {k: step.input.get(k) for k in ("window", "only_keys")}
        rendered = {**rendered, **extra}
    if mask_secrets(rendered) != step.input:
        log.warning("run %s step %s: re-rendered input differs from the recorded one", state.run_id, definition.name)
    if (names or contains_ciphertext(template)) and definition.action not in _RECORDED_AGAIN:
        return PendingInput(state.tenant_id, state.environment.value, template, context, names, extra)
    return rendered


# Actions whose runner never suspends (no I/O, no sleep): a timeout could not fire before they return.
_NEVER_WAITS = frozenset({"transform"})

# Their input is written to the ledger again (a child's trigger, a pause's prompt): secrets stay masked there.
_RECORDED_AGAIN = (StepAction.SUBFLOW, StepAction.HUMAN_INPUT)


class StepRunners:
    def __init__(self, *, allow_private_networks: bool, time_scale: float, max_body_bytes: int,
                 kafka_bootstrap: str = "127.0.0.1:19092", topic_prefix: str = "flowtrail",
                 connectors: dict[str, str] | None = None, max_output_bytes: int = 256 * 1024,
                 db_max_rows: int = 1000, secrets: SecretReader | None = None) -> None:  # fmt: skip
        self.allow_private = allow_private_networks
        self.secrets = secrets  # the tenant secrets store, for inputs that reference it (PendingInput)
        self.time_scale = time_scale
        self.max_body = max_body_bytes
        self.max_output = max_output_bytes
        # Every connection is resolved once, checked and pinned to the checked address (services.common.netguard).
        self.http = guarded_client(allow_private_networks, follow_redirects=False)
        # One registry: the tenant's connectors (POST /v1/connectors), then the operator's (…_EXECUTOR_CONNECTORS).
        self.connectors = ConnectorRegistry(connectors or {}, secrets)
        self.db = DatabaseActions(connectors=self.connectors, allow_private=allow_private_networks,
                                  max_rows=db_max_rows, max_output_bytes=max_output_bytes)  # fmt: skip
        self.kafka = KafkaActions(bootstrap=kafka_bootstrap, reserved_prefix=topic_prefix, connectors=self.connectors,
                                  max_output_bytes=max_output_bytes, allow_private=allow_private_networks)  # fmt: skip
        self.python = PythonActions(max_output_bytes=max_output_bytes)
        # Its output keeps every failed record and upsert (decide turns them into their own ledger events), so
        # it is capped by the record counts of the source, not by max_output_bytes.
        self.sync = SyncRecordsActions(connectors=self.connectors, allow_private=allow_private_networks,
                                       max_output_bytes=max_output_bytes, http=self.http, db=self.db)  # fmt: skip
        self._actions: dict[str, Callable[[StepCall], Awaitable[Any]]] = {
            "http_request": self._http_request,
            "transform": self._transform,
            "delay": self._delay,
            "database_query": self.db.query,
            "kafka_produce": self.kafka.produce,
            "kafka_consume": self.kafka.consume,
            "python": self.python.call,
            "sync_records": self.sync.sync,
            "redis_get": lambda call: self.redis.get(call),
            "redis_set": lambda call: self.redis.set(call),
            "grpc_call": lambda call: self.grpc.call(call),
        }

    # redis-py, grpcio and protobuf are imported when a step first needs them, not at every executor start.
    @cached_property
    def redis(self) -> RedisActions:
        from services.executor.adapters.actions_redis import RedisActions

        return RedisActions(connectors=self.connectors, allow_private=self.allow_private,
                            max_output_bytes=self.max_output)  # fmt: skip

    @cached_property
    def grpc(self) -> GrpcActions:
        from services.executor.adapters.actions_grpc import GrpcActions

        return GrpcActions(connectors=self.connectors, allow_private=self.allow_private,
                           max_output_bytes=self.max_output)  # fmt: skip

    @classmethod
    def from_settings(cls, settings: ExecutorSettings) -> StepRunners:
        return cls(
            allow_private_networks=settings.allow_private_networks,
            time_scale=settings.time_scale,
            max_body_bytes=settings.http_max_body_bytes,
            kafka_bootstrap=settings.kafka_bootstrap,
            topic_prefix=settings.topic_prefix,
            connectors=settings.connectors,
            max_output_bytes=settings.step_output_max_bytes,
            db_max_rows=settings.db_max_rows,
            secrets=SecretReader.from_settings(settings),
        )

    async def close(self) -> None:
        await self.http.aclose()
        await self.sync.close()
        await self.db.close()
        await self.kafka.close()
        if "redis" in self.__dict__:
            await self.redis.close()
        if "grpc" in self.__dict__:
            await self.grpc.close()
        if self.secrets is not None:
            await self.secrets.close()

    async def run(self, call: StepCall) -> StepOutcome:
        if not isinstance(call.input, PendingInput):
            return await self._run(call)
        began = time.perf_counter()
        try:
            spec, texts = await asyncio.wait_for(resolve(call.input, self.secrets), timeout=call.timeout_s)
        except StepError as exc:
            return StepOutcome(ok=False, error=exc.error, duration_ms=_ms(began))
        except TimeoutError:
            error = ErrorInfo(category=ErrorCategory.TRANSIENT, code="secrets_unavailable",
                              message=f"the secrets store did not answer within {call.timeout_s:g}s")  # fmt: skip
            return StepOutcome(ok=False, error=error, duration_ms=_ms(began))
        try:
            outcome = await self._run(dataclasses.replace(call, input=spec, scrub=frozenset(texts)))
        except Exception as exc:  # an executor bug: recorded with its message as INTERNAL_ERROR, never a secret
            if any(t in str(exc) for t in texts):
                raise RuntimeError(f"{type(exc).__name__}: {redact(str(exc), texts)}") from None
            raise
        return scrub(outcome, texts)

    async def _run(self, call: StepCall) -> StepOutcome:
        began = time.perf_counter()
        try:
            action = self._actions.get(call.action)
            if action is None:
                raise StepError(ErrorCategory.VALIDATION, f"action {call.action!r} is not available in this executor")
            if not isinstance(call.input, dict):
                raise StepError(ErrorCategory.VALIDATION, "step input must be an object")
            timeout = call.timeout_s
            if call.action == "delay":
                timeout += float(call.input.get("seconds", 0)) * self.time_scale
            if call.action in _NEVER_WAITS:
                output = await action(call)  # it cannot outlast any timeout: no timer to arm and cancel
            else:
                # In this task (asyncio.timeout), not in one more per step as wait_for would start.
                async with asyncio.timeout(timeout):
                    output = await action(call)
            duration = _ms(began)
            if call.action == "delay":
                # A durable timer runs from the recorded start, which precedes this call: show all of it.
                duration = max(duration, (datetime.now(UTC) - call.started_at).total_seconds() * 1000)
            return StepOutcome(ok=True, output=self._capped(call, output), duration_ms=duration)
        except StepError as exc:
            return StepOutcome(ok=False, output=self._capped(call, exc.output), error=exc.error, duration_ms=_ms(began))
        except TimeoutError:
            error = ErrorInfo(category=ErrorCategory.TRANSIENT, code="timeout",
                              message=f"step timed out after {call.timeout_s:g}s")  # fmt: skip
            return StepOutcome(ok=False, error=error, duration_ms=_ms(began))

    def _capped(self, call: StepCall, output: Any) -> Any:
        """Every step's output as recorded: past `step_output_max_bytes` of JSON, a preview with a truncation
        marker. sync_records is exempt: its records become their own events and the step keeps only counters."""
        if output is None or call.action == "sync_records":
            return output
        if call.scrub:
            output = redact(output, set(call.scrub))
        try:
            return cap_output(output, self.max_output)
        except TypeError:  # not JSON: the codec will say so when the event is built
            return output

    async def _transform(self, call: StepCall) -> Any:
        # The mapping was rendered from the run's context when the step started; it is the output.
        return call.input.get("output", call.input)

    async def _delay(self, call: StepCall) -> Any:
        seconds = call.input.get("seconds", 0)
        if not isinstance(seconds, int | float) or seconds < 0:
            raise StepError(ErrorCategory.VALIDATION, f"delay seconds must be a number >= 0, got {seconds!r}")
        # Durable: the timer counts from the recorded start, so a restarted executor waits only the rest.
        due = call.started_at.timestamp() + seconds * self.time_scale
        await asyncio.sleep(max(0.0, due - datetime.now(UTC).timestamp()))
        return {"waited_s": seconds}

    async def _http_request(self, call: StepCall) -> Any:
        spec = call.input
        method = str(spec.get("method", "GET")).upper()
        url = spec.get("url")
        if not isinstance(url, str):
            raise StepError(ErrorCategory.VALIDATION, "http_request needs a string `url`")
        headers = {str(k): str(v) for k, v in (spec.get("headers") or {}).items()}
        headers.setdefault("Idempotency-Key", call.idempotency_key)
        body = spec.get("body")
        content = orjson.dumps(body) if body is not None and not isinstance(body, str) else body
        if body is not None and not isinstance(body, str):
            headers.setdefault("Content-Type", "application/json")
        timeout = float(spec.get("timeout_s", call.timeout_s))
        response = None
        for _ in range(int(spec.get("max_redirects", 5)) + 1):
            try:
                # The scheme and host here; the address where each hop connects (guarded_client), so neither a
                # redirect nor a DNS answer that changes after a check reaches a private network.
                await check_url(url, allow_private=True)
                response = await self.http.request(method, url, headers=headers, content=content, timeout=timeout)
            except BlockedAddress as exc:
                raise StepError(ErrorCategory.VALIDATION, str(exc), code="blocked_address") from exc
            except UnresolvableHost as exc:
                # TRANSIENT: a resolver outage looks the same as a name that is gone; retries say which it was.
                raise StepError(ErrorCategory.TRANSIENT, str(exc), code="unresolvable_host") from exc
            except (httpx.TransportError, OSError) as exc:
                raise StepError(ErrorCategory.TRANSIENT, f"{type(exc).__name__}: {exc}", code="network") from exc
            if not response.is_redirect:
                break
            url = str(response.next_request.url) if response.next_request else url
            if response.status_code in (301, 302, 303):
                method, content = "GET", None
        assert response is not None
        output = {
            "request": {"method": method, "url": mask_text(url), "headers": mask_secrets(headers)},
            "status": response.status_code,
            "headers": dict(response.headers),
            "body": self._body(response),
        }
        if response.is_redirect:
            raise StepError(ErrorCategory.VALIDATION, "too many redirects", output=output)
        if response.status_code >= 400:
            raise StepError(
                classify_status(response.status_code),
                f"{method} {url} answered {response.status_code} {response.reason_phrase}",
                output=output,
                status_code=response.status_code,
                code="http_status",
            )
        return output

    def _body(self, response: httpx.Response) -> Any:
        raw = response.content[: self.max_body]
        if "json" in response.headers.get("content-type", ""):
            try:
                return orjson.loads(raw)
            except orjson.JSONDecodeError:
                pass
        text = raw.decode(response.encoding or "utf-8", errors="replace")
        return text + ("…[truncated]" if len(response.content) > self.max_body else "")


def _ms(began: float) -> float:
    return round((time.perf_counter() - began) * 1000, 3)
