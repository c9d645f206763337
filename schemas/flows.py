"""Flow definitions: immutable versions of a flow's trigger config, steps and policies (docs/flows.md)."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from schemas.expressions import (
    ExpressionError,
    _strings,  # the same walk the steps' check uses
    compile_expression,
    expression_errors,
    template_expressions,
)

STEP_NAME_PATTERN = r"^[a-zA-Z][a-zA-Z0-9_\-]{0,63}$"
# The validation context of a definition read back from the flows topic (schemas.codec): it was checked when it
# was published, by the rules of that day. Checks added since (`expression_errors`) must never make a published
# version unreadable; its bad expression fails the run that evaluates it, as it did then.
_STORED = "flowtrail_stored_flow"
STORED_FLOW: dict[str, Any] = {_STORED: True}


class Environment(StrEnum):
    PRODUCTION = "PRODUCTION"
    TESTING = "TESTING"


class StepAction(StrEnum):
    HTTP_REQUEST = "http_request"
    TRANSFORM = "transform"
    DELAY = "delay"
    DATABASE_QUERY = "database_query"
    KAFKA_PRODUCE = "kafka_produce"
    KAFKA_CONSUME = "kafka_consume"
    HUMAN_INPUT = "human_input"
    SUBFLOW = "subflow"
    SYNC_RECORDS = "sync_records"
    PYTHON = "python"
    REDIS_GET = "redis_get"
    REDIS_SET = "redis_set"
    GRPC_CALL = "grpc_call"


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RetryPolicy(Frozen):
    """Backoff schedule in seconds; the attempt after the last delay is the last one."""

    # A negative delay would put retry_at in the past; a non-positive limit would silently never retry.
    delays_s: tuple[Annotated[float, Field(ge=0)], ...] = (1, 5, 30, 300, 1800, 7200)
    max_elapsed_s: float = Field(default=24 * 3600, gt=0)
    retry_conflict_once: bool = True


class Assertion(Frozen):
    """`expression` (JMESPath, or JSONPath when it starts with `$`, over the step's output) compared with
    `expected` by `operator`; `{{ ... }}` templates in `expected` are rendered from the run's context when the
    assertion is evaluated (docs/flows.md)."""

    expression: str
    expected: Any = None
    operator: Literal["eq", "ne", "gt", "gte", "lt", "lte", "contains", "exists"] = "eq"


class StepDefinition(Frozen):
    name: str = Field(pattern=STEP_NAME_PATTERN)
    action: StepAction
    input: dict[str, Any] = Field(default_factory=dict)
    run_condition: str | None = None
    timeout_s: float | None = Field(default=None, gt=0)
    retry: RetryPolicy | None = None
    assertions: tuple[Assertion, ...] = ()
    # variable name → JMESPath (or JSONPath when it starts with `$`) over the step's output; later steps read
    # `vars.<name>`.
    extract: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _input_fields(self, info: ValidationInfo) -> StepDefinition:
        """The input of an action with a published model is checked at publish (docs/flows.md): unknown fields,
        missing ones and bad values are refused; a value that is a `{{ … }}` template is checked when it is rendered
        at run time. Not re-checked for a stored version."""
        model = _PUBLISH_CHECKED.get(self.action)
        if model is None or (isinstance(info.context, dict) and info.context.get(_STORED)):
            return self
        problems = input_problems(model, self.input)
        if problems:
            raise PydanticCustomError("step_input", "{action} input: {problems}",
                                      {"action": self.action.value, "problems": "; ".join(problems)})  # fmt: skip
        return self


def input_problems(model: type[BaseModel], value: Any) -> list[str]:
    """What `model` refuses in a step's input, leaving out values that are templates (rendered at run time)."""
    try:
        model.model_validate(value)
    except ValidationError as exc:
        return [f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}" for e in exc.errors()
                if not (isinstance(e.get("input"), str) and template_expressions(e["input"]))]  # fmt: skip
    return []


KAFKA_TOPIC_PATTERN = r"^[a-zA-Z0-9._\-]{1,249}$"
_KAFKA_FIELDS = ("connector", "key_pattern", "filter", "input", "value_format", "start_from", "resume_from")
_WEBHOOK_FIELDS = ("signature_header", "signature_scheme", "signed_content", "secret_name", "tolerance_s",
                   "delivery_id_header", "delivery_id_path", "url_generation")  # fmt: skip
# An HTTP header name (RFC 9110 token characters).
_HEADER_NAME = r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,100}$"


class TriggerConfig(Frozen):
    """How runs of a flow start. A `kafka` trigger reads `topic` and makes one run per message that passes
    `key_pattern` and `filter`, with `input` rendered from the message (docs/kafka-triggers.md)."""

    type: Literal["manual", "api", "webhook", "schedule", "kafka"] = "manual"
    cron: str | None = None
    interval_s: float | None = None
    topic: str | None = None
    # kafka: the tenant's `kafka` connector (name or id) whose cluster holds `topic`; absent: the deployment's own.
    connector: str | None = Field(default=None, min_length=1, max_length=100)
    # kafka: a regular expression the whole key (UTF-8) must match; a message without a key never matches.
    key_pattern: str | None = None
    # kafka: JMESPath (JSONPath when it starts with `$`) over the decoded value; the message runs when truthy.
    filter: str | None = None
    # kafka: the run input, `{{ … }}` templates over value, key, headers, topic, partition, offset, timestamp;
    # absent: the decoded value itself.
    input: Any = None
    # kafka: the value as JSON (an undecodable one is dead-lettered) or as UTF-8 text.
    value_format: Literal["json", "text"] = "json"
    # kafka: where a subscription with no committed position starts: at the first message produced after this
    # version was published, at the oldest message kept, or at the next message produced.
    start_from: Literal["published", "earliest", "latest"] = "published"
    # kafka: after a pause, go on from the message where consumption stopped, or skip to the newest.
    resume_from: Literal["stopped", "newest"] = "stopped"
    # webhook (docs/intake.md#webhook-triggers): the header carrying the upstream's signature; absent: unsigned.
    signature_header: str | None = Field(default=None, pattern=_HEADER_NAME)
    # webhook: HMAC-SHA256 of the signed content, as hex or base64.
    signature_scheme: Literal["hmac-sha256-hex", "hmac-sha256-base64"] = "hmac-sha256-hex"
    # webhook: the raw body, or Stripe's `t=<unix time>,v1=<signature>` header signing `<t>.<body>`.
    signed_content: Literal["body", "t.body"] = "body"
    # webhook: the name of the secret in the secrets store (docs/secrets.md) that signs deliveries.
    secret_name: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
    # webhook, `t.body`: how far a delivery's `t` may be from now, in seconds (replays of older ones are refused).
    tolerance_s: int = Field(default=300, ge=1, le=86_400)
    # webhook: the header naming a delivery; a redelivery with the same value is the same run.
    delivery_id_header: str = Field(default="Idempotency-Key", pattern=_HEADER_NAME)
    # webhook: without that header, JMESPath (JSONPath when it starts with `$`) to the delivery's id in the body
    # (Stripe's `id`).
    delivery_id_path: str | None = Field(default=None, min_length=1, max_length=500)
    # webhook: raising it retires every hook URL issued before (a leaked URL).
    url_generation: int = Field(default=1, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _kafka_options(self, info: ValidationInfo) -> TriggerConfig:
        """The kafka and webhook options only on their own trigger type, the kafka ones compiled and a webhook's
        signature complete; not re-checked for a stored version."""
        if isinstance(info.context, dict) and info.context.get(_STORED):
            return self
        _only_on(self, "webhook", _WEBHOOK_FIELDS)
        if self.type == "webhook" and (self.signature_header is None) != (self.secret_name is None):
            raise ValueError("signature_header and secret_name: a signed webhook needs both, an unsigned one neither")
        _only_on(self, "kafka", _KAFKA_FIELDS)
        if self.type == "webhook" and self.delivery_id_path is not None:
            try:
                compile_expression(self.delivery_id_path)
            except ExpressionError as exc:
                message = "delivery_id_path: {problem}"
                raise PydanticCustomError("flow_expression", message, {"problem": str(exc)}) from None
        if self.type != "kafka":
            return self
        problems = []
        if self.topic is not None and not re.fullmatch(KAFKA_TOPIC_PATTERN, self.topic):
            problems.append(f"topic: {self.topic!r} is not a Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)")
        if self.key_pattern is not None:
            try:
                re.compile(self.key_pattern)
            except re.error as exc:
                problems.append(f"key_pattern: not a regular expression: {exc}")
        expressions = [("filter", self.filter)] if self.filter is not None else []
        expressions += [(place, e) for place, text in _strings(self.input, "input")
                        for e in template_expressions(text)]  # fmt: skip
        for place, expression in expressions:
            try:
                compile_expression(expression)
            except ExpressionError as exc:
                problems.append(f"{place}: {exc}")
        if problems:
            raise PydanticCustomError("flow_expression", "{problems}", {"problems": "; ".join(problems)})
        return self


def _only_on(trigger: TriggerConfig, kind: str, names: tuple[str, ...]) -> None:
    """Options of one trigger type set on another type are refused. Set means other than the default: a dump of
    any trigger carries every field, at its default."""
    given = [n for n in names if getattr(trigger, n) != type(trigger).model_fields[n].default]
    if trigger.type != kind and given:
        raise ValueError(f"{', '.join(given)}: only a {kind} trigger takes these, not {trigger.type}")


class FlowDefinition(Frozen):
    id: str = Field(pattern=r"^[a-zA-Z0-9_\-]{1,64}$")
    tenant_id: str
    name: str
    version: int = Field(ge=1)
    description: str = ""
    # The name `POST /v1/actions/{action_name}/async|live` knows the flow by besides its id (docs/flows.md).
    action_name: str | None = Field(default=None, pattern=r"^[a-zA-Z0-9_\-.]{1,128}$")
    environment: Environment = Environment.PRODUCTION
    trigger: TriggerConfig = TriggerConfig()
    steps: tuple[StepDefinition, ...] = Field(min_length=1)
    retry: RetryPolicy = RetryPolicy()
    timeout_s: float | None = Field(default=None, gt=0)
    concurrency_limit: int | None = Field(default=None, ge=1)
    tags: tuple[str, ...] = ()
    input_schema: dict[str, Any] | None = None

    @field_validator("steps")
    @classmethod
    def _unique_step_names(cls, steps: tuple[StepDefinition, ...]) -> tuple[StepDefinition, ...]:
        names = [s.name for s in steps]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"step names must be unique; repeated: {', '.join(duplicates)}")
        return steps

    @field_validator("steps")
    @classmethod
    def _expressions_compile(
        cls, steps: tuple[StepDefinition, ...], info: ValidationInfo
    ) -> tuple[StepDefinition, ...]:
        """Every template, JMESPath and JSONPath expression compiles, or the definition is refused naming each
        (`steps[2] (fetch_user).extract.user_id: invalid JSONPath '$.user[': …`). Not for a stored version."""
        if isinstance(info.context, dict) and info.context.get(_STORED):
            return steps
        errors = expression_errors(steps)
        if errors:
            raise PydanticCustomError("flow_expression", "{problems}", {"problems": "; ".join(errors)})
        return steps

    def step(self, name: str) -> StepDefinition:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    def position(self, name: str) -> int:
        """The step's index in the flow, 0 for the first."""
        for i, s in enumerate(self.steps):
            if s.name == name:
                return i
        raise KeyError(name)


# ---------------------------------------------------------------- action inputs (validated after rendering)


class DatabaseConnection(Frozen):
    """A PostgreSQL database, named by exactly one of a connector or a DSN (`database_query`'s and sync ends')."""

    connector: str | None = None  # a name from FLOWTRAIL_EXECUTOR_CONNECTORS, configured by the operator
    dsn: str | None = None  # postgresql://user:password@host:port/db; the password is masked wherever shown

    @model_validator(mode="after")
    def _one_connection(self) -> DatabaseConnection:
        if (self.connector is None) == (self.dsn is None):
            raise ValueError("give exactly one of `connector` (a configured name) or `dsn`")
        return self


class DatabaseQueryInput(DatabaseConnection):
    """`database_query`: one SQL statement with `$1…` parameters on a named connector or a DSN."""

    query: str = Field(min_length=1)
    params: list[Any] = Field(default_factory=list)  # bound by the server, never formatted into the SQL
    max_rows: int | None = Field(default=None, ge=1)
    timeout_s: float | None = Field(default=None, gt=0)  # the statement timeout; the step timeout caps it
    read_only: bool = False


class KafkaProduceInput(Frozen):
    """`kafka_produce`: a string value is sent as UTF-8 text, any other value as JSON; null is a tombstone."""

    connector: str | None = None  # a kafka:// connector; the executor's own cluster when absent
    topic: str = Field(min_length=1, max_length=249)
    key: Any = None
    value: Any = None
    headers: dict[str, Any] = Field(default_factory=dict)
    partition: int | None = Field(default=None, ge=0)


class KafkaConsumeInput(Frozen):
    """`kafka_consume`: from a group's committed position, or from `from_offset` (earliest, latest, a number)."""

    connector: str | None = None
    topic: str = Field(min_length=1, max_length=249)
    group: str | None = Field(default=None, min_length=1)
    # Without a group: where to read from. With one: only where a group with no committed offset starts.
    from_offset: Literal["earliest", "latest"] | Annotated[int, Field(ge=0)] = "earliest"
    partition: int | None = Field(default=None, ge=0)
    max_messages: int = Field(default=100, ge=1, le=10_000)
    timeout_s: float = Field(default=5.0, gt=0)


class PythonInput(Frozen):
    """`python`: the function registered under entry-point group `flowtrail.actions`, called with `input`."""

    function: str = Field(min_length=1)
    input: Any = None


class RedisGetInput(Frozen):
    """`redis_get`: the value of `key` on a `redis://` (or `rediss://`) connector; null when the key is missing."""

    connector: str = Field(min_length=1, max_length=100)
    key: str = Field(min_length=1, max_length=4096)
    # The stored bytes as UTF-8 text, or parsed as JSON (a value that is not JSON fails the step).
    value_format: Literal["text", "json"] = "text"
    # Overrides the connector URL's password; write `{{ secrets.NAME }}` (docs/secrets.md).
    password: str | None = None


class RedisSetInput(Frozen):
    """`redis_set`: a string value is stored as UTF-8 text, any other value as JSON; optional expiry and NX/XX."""

    connector: str = Field(min_length=1, max_length=100)
    key: str = Field(min_length=1, max_length=4096)
    value: str | int | float | bool | list[Any] | dict[str, Any]
    ttl_s: float | None = Field(default=None, gt=0, le=10 * 365 * 86_400)  # expires after; absent: never
    # nx: only when the key does not exist yet; xx: only when it does. Not written: `written` is false.
    condition: Literal["nx", "xx"] | None = None
    password: str | None = None


_GRPC_NAME = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"


class GrpcCallInput(Frozen):
    """`grpc_call`: one unary call; the request and the response are JSON (protobuf's JSON mapping). The message
    types come from the server's reflection, or from `descriptor_set` (a base64 FileDescriptorSet,
    `protoc --include_imports --descriptor_set_out`)."""

    connector: str | None = Field(default=None, min_length=1, max_length=100)  # a grpc:// or grpcs:// connector
    target: str | None = Field(default=None, pattern=r"^grpcs?://[^/?#\s]+$")  # grpc://host:port, grpcs://…
    service: str = Field(pattern=_GRPC_NAME, max_length=500)  # fully qualified: `package.Service`
    method: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=200)
    request: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, str] = Field(default_factory=dict)  # lower-case keys; `-bin` keys are not supported
    deadline_s: float | None = Field(default=None, gt=0)  # the step timeout caps it
    descriptor_set: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_target(self) -> GrpcCallInput:
        if (self.connector is None) == (self.target is None):
            raise ValueError("give exactly one of `connector` (a configured name) or `target` (grpc://host:port)")
        bad = sorted(k for k in self.metadata if k != k.lower() or k.endswith("-bin") or not k)
        if bad:
            raise ValueError(f"metadata keys must be lower case and not end in -bin: {', '.join(bad)}")
        if self.descriptor_set is not None and not template_expressions(self.descriptor_set):
            problem = _descriptor_set_problem(self.descriptor_set, self.service, self.method)
            if problem:
                raise ValueError(f"descriptor_set: {problem}")
        return self


def _descriptor_set_problem(encoded: str, service: str, method: str) -> str | None:
    """Why a base64 FileDescriptorSet cannot serve `service`/`method` (unreadable, no such service or method)."""
    from google.protobuf import descriptor_pb2
    from google.protobuf.message import DecodeError

    try:
        files = descriptor_pb2.FileDescriptorSet.FromString(base64.b64decode(encoded, validate=True)).file
    except (binascii.Error, DecodeError, ValueError) as exc:
        return f"not a base64 FileDescriptorSet ({exc})"
    services = {(f"{f.package}.{s.name}" if f.package else s.name): s for f in files for s in f.service}
    found = services.get(service)
    if found is None:
        return f"no service {service!r} (it has: {', '.join(sorted(services)) or 'none'})"
    methods = sorted(m.name for m in found.method)
    return None if method in methods else f"service {service!r} has no method {method!r} (it has: {', '.join(methods)})"


_PUBLISH_CHECKED: dict[StepAction, type[BaseModel]] = {
    StepAction.REDIS_GET: RedisGetInput,
    StepAction.REDIS_SET: RedisSetInput,
    StepAction.GRPC_CALL: GrpcCallInput,
}


# ---------------------------------------------------------------- secrets in step inputs

MASK = "***"
# Key names (lower case, letters and digits only) ending like these hold credentials.
_SECRET_SUFFIXES = (
    "password", "passwd", "passphrase", "pwd", "secret", "token", "apikey", "authorization", "cookie",
    "privatekey", "credential", "credentials", "accesskey", "sessionid",
)  # fmt: skip
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/?#@\s]*:)([^@\s/?#]+)(@)")
_KEY_VALUE = re.compile(r"(^|[?&;\s])([A-Za-z0-9_.\-]+)=([^&;#\s]*)")


def is_secret_key(name: str) -> bool:
    """`db_password`, `X-Api-Key`, `client_secret`, `Authorization`… (not `max_tokens` or `auth`)."""
    normalized = "".join(c for c in name.lower() if c.isalnum())
    return normalized.endswith(_SECRET_SUFFIXES)


def mask_text(text: str) -> str:
    """Hide the password of a URL or DSN and secret `key=value` parameters in a string."""
    if "://" not in text and "=" not in text:
        return text
    text = _URL_PASSWORD.sub(rf"\g<1>{MASK}\g<3>", text)
    return _KEY_VALUE.sub(lambda m: m.group(0) if not is_secret_key(m.group(2)) or not m.group(3)
                          else f"{m.group(1)}{m.group(2)}={MASK}", text)  # fmt: skip


def mask_secrets(value: Any) -> Any:
    """A step input as it may be shown: values of secret keys and passwords inside strings are `***`."""
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, dict):
        return {k: MASK if is_secret_key(str(k)) and v not in (None, "") else mask_secrets(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_secrets(v) for v in value]
    return value


def any_text(value: Any, test: Callable[[str], bool]) -> bool:
    """Whether `test` holds for some string in a JSON-like value, at any depth (dict values, list items)."""
    if isinstance(value, str):
        return test(value)
    if isinstance(value, dict):
        return any(any_text(v, test) for v in value.values())
    if isinstance(value, list | tuple):
        return any(any_text(v, test) for v in value)
    return False


def contains_mask(value: Any) -> bool:
    """Whether `mask_secrets` hid something here (or a value merely contains `***`)."""
    return any_text(value, lambda text: MASK in text)
