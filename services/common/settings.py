"""Settings every Flowtrail process shares: where Kafka, PostgreSQL and the state folder are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]

DEFAULT_KAFKA_PORT = 19092
DEFAULT_KAFKA_CONTROLLER_PORT = 19093
DEFAULT_POSTGRES_PORT = 15432
DEFAULT_API_PORT = 8700
DEFAULT_INGEST_PORT = 8701
DEFAULT_EXECUTOR_WEB_PORT = 8702
DEFAULT_PROJECTOR_METRICS_PORT = 8703


class CommonSettings(BaseSettings):
    """`FLOWTRAIL_…` variables read by every service and by the launcher."""

    model_config = SettingsConfigDict(env_prefix="FLOWTRAIL_", extra="ignore", populate_by_name=True)

    state_dir: Path = Field(default=REPO_ROOT / ".state")
    kafka_bootstrap: str = f"127.0.0.1:{DEFAULT_KAFKA_PORT}"
    database_url: str = f"postgresql://flowtrail@127.0.0.1:{DEFAULT_POSTGRES_PORT}/flowtrail"
    # One PostgreSQL schema holds every table; tests give each test its own.
    database_schema: str = "flowtrail"
    # Every topic name starts with this; tests give each test its own topic set.
    topic_prefix: str = "flowtrail"
    partitions: int = Field(default=4, ge=1, le=256)
    log_level: str = "INFO"
    # The broker's message.max.bytes (Kafka's default is 1,048,588): no producer batch is built larger, and a
    # single trigger, command or flow definition that cannot fit is refused with 413 before it reaches Kafka.
    kafka_max_message_bytes: int = Field(default=1_000_000, ge=16_384)
    # How long an append waits for Kafka's acknowledgement before the request answers 503 (with Retry-After).
    kafka_append_timeout_s: float = Field(default=10.0, gt=0, le=120)
    # Secrets at rest (docs/secrets.md). FLOWTRAIL_SECRETS_KEY: keys as base64url (32 bytes each), comma-separated,
    # the first encrypts, all decrypt. Unset: the key file FLOWTRAIL_SECRETS_KEY_FILE (empty: <state_dir>/secrets.key),
    # one key a line, created with one new key and mode 600 when missing.
    secrets_key: SecretStr = SecretStr("")
    secrets_key_file: str = ""

    @property
    def secrets_key_value(self) -> str:
        return self.secrets_key.get_secret_value()

    @property
    def secrets_key_path(self) -> Path:
        return Path(self.secrets_key_file) if self.secrets_key_file else self.state_dir / "secrets.key"


def service_field(service: str, name: str, default: Any, **kwargs: Any) -> Any:
    """A service's own setting, read from `FLOWTRAIL_<SERVICE>_<NAME>` (STYLE: settings names)."""
    # Only the prefixed name: a bare `PORT` or `HOST` set by a shell or a platform must not move a service. The field
    # name still works as a constructor keyword (`populate_by_name`).
    return Field(default=default, validation_alias=f"FLOWTRAIL_{service}_{name}".upper(), **kwargs)
