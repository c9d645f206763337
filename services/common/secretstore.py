"""The tenant secrets store: named values, encrypted in PostgreSQL (`secrets`, migration 0021), per tenant and
environment. The API writes them (services/api/routes/secrets.py); the executor reads the ones a step's input
references (`{{ secrets.NAME }}`) right before the step runs; `flowtrail secrets rotate-key` re-encrypts them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import asyncpg

from services.common.crypto import (
    PREFIX,
    Keyring,
    decrypt_all,
    inline_context,
    reencrypt_all,
    store_context,
)
from services.common.db import create_pool
from services.common.settings import CommonSettings

# A JMESPath identifier, so `{{ secrets.NAME }}` needs no quoting.
NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
MAX_VALUE_CHARS = 64 * 1024


def keyring_of(holder: Any, settings: CommonSettings) -> Keyring:
    """The process's keyring, made once and kept on `holder` (an app's state): the key file is read (or created)
    on first use."""
    ring: Keyring | None = getattr(holder, "keyring", None)
    if ring is None:
        ring = Keyring.from_settings(settings)
        holder.keyring = ring
    return ring


async def put_secret(
    conn: asyncpg.Connection, keyring: Keyring, tenant_id: str, environment: str, name: str, value: str
) -> tuple[asyncpg.Record, bool]:
    """Creates or replaces (rotates) a secret; returns its public row and whether it was created."""
    token = keyring.encrypt(value, store_context(tenant_id, environment, name))
    row = await conn.fetchrow(
        """
        INSERT INTO secrets (tenant_id, environment, name, value) VALUES ($1, $2, $3, $4)
        ON CONFLICT (tenant_id, environment, name)
        DO UPDATE SET value = EXCLUDED.value, last_rotated_at = clock_timestamp(), version = secrets.version + 1
        RETURNING name, environment, version, created_at, last_rotated_at, (xmax = 0) AS created
        """,
        tenant_id, environment, name, token,
    )  # fmt: skip
    assert row is not None
    return row, bool(row["created"])


async def list_secrets(conn: asyncpg.Connection | asyncpg.Pool, tenant_id: str, environment: str) -> list[Any]:
    rows = await conn.fetch(
        "SELECT name, environment, version, created_at, last_rotated_at FROM secrets "
        "WHERE tenant_id = $1 AND environment = $2 ORDER BY name",
        tenant_id,
        environment,
    )
    return list(rows)


async def delete_secret(conn: asyncpg.Connection | asyncpg.Pool, tenant_id: str, environment: str, name: str) -> bool:
    deleted = await conn.fetchval(
        "DELETE FROM secrets WHERE tenant_id = $1 AND environment = $2 AND name = $3 RETURNING name",
        tenant_id, environment, name,
    )  # fmt: skip
    return deleted is not None


async def read_secrets(
    conn: asyncpg.Connection | asyncpg.Pool, keyring: Keyring, tenant_id: str, environment: str,
    names: Collection[str],
) -> dict[str, str]:  # fmt: skip
    """The named secrets' values, decrypted; names that do not exist are absent."""
    if not names:
        return {}
    rows = await conn.fetch(
        "SELECT name, value FROM secrets WHERE tenant_id = $1 AND environment = $2 AND name = ANY($3::text[])",
        tenant_id, environment, sorted(names),
    )  # fmt: skip
    return {r["name"]: keyring.decrypt(r["value"], store_context(tenant_id, environment, r["name"])) for r in rows}


def open_config(config: Any, keyring: Keyring, tenant_id: str) -> Any:
    """A stored connector config with its inline credentials decrypted (for the check that uses them)."""
    return decrypt_all(config, keyring, inline_context(tenant_id))


@dataclass
class Reencrypted:
    secrets: int = 0
    secrets_total: int = 0
    connectors: int = 0
    connectors_total: int = 0


async def reencrypt_stored(conn: asyncpg.Connection, keyring: Keyring) -> Reencrypted:
    """Every ciphertext PostgreSQL holds as control-plane state (the secrets store, connector configs) moved to
    the keyring's current key, in one transaction. Flow versions are not rewritten: they are projected from the
    flows topic, which is immutable (a rebuild would bring the old ciphertexts back); the old key opens them."""
    done = Reencrypted()
    async with conn.transaction():
        for r in await conn.fetch("SELECT tenant_id, environment, name, value FROM secrets FOR UPDATE"):
            done.secrets_total += 1
            value = keyring.reencrypt(r["value"], store_context(r["tenant_id"], r["environment"], r["name"]))
            if value != r["value"]:
                await conn.execute(
                    "UPDATE secrets SET value = $4 WHERE tenant_id = $1 AND environment = $2 AND name = $3",
                    r["tenant_id"], r["environment"], r["name"], value,
                )  # fmt: skip
                done.secrets += 1
        for r in await conn.fetch("SELECT tenant_id, id, config FROM connectors FOR UPDATE"):
            done.connectors_total += 1
            if PREFIX not in str(r["config"]):
                continue
            config = reencrypt_all(r["config"], keyring, inline_context(r["tenant_id"]))
            if config != r["config"]:
                await conn.execute(
                    "UPDATE connectors SET config = $3 WHERE tenant_id = $1 AND id = $2",
                    r["tenant_id"],
                    r["id"],
                    config,
                )
                done.connectors += 1
    return done


class SecretReader:
    """The executor's read access to the store: a small pool opened on the first step that needs a secret."""

    def __init__(self, database_url: str, schema: str, keyring: Keyring) -> None:
        self.database_url = database_url
        self.schema = schema
        self.keyring = keyring
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> SecretReader:
        return cls(settings.database_url, settings.database_schema, Keyring.from_settings(settings))

    async def _get_pool(self) -> asyncpg.Pool:
        async with self._lock:
            if self._pool is None:
                self._pool = await create_pool(self.database_url, self.schema, min_size=0, max_size=2)
            return self._pool

    async def pool(self) -> asyncpg.Pool:
        """The executor's pool on the control-plane tables (secrets, connectors), opened on first use."""
        return await self._get_pool()

    async def read(self, tenant_id: str, environment: str, names: Collection[str]) -> dict[str, str]:
        return await read_secrets(await self._get_pool(), self.keyring, tenant_id, environment, names)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
