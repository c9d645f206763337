"""Flowtrail's public Python surface: `flowtrail.client` for the HTTP API (docs/client.md) and `flowtrail.ledger`
for jobs that read the ledger itself (docs/ledger.md). `from flowtrail import Client` works too; the client is
imported on first use, so a ledger job does not load it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flowtrail.client import AsyncClient, Client, FlowtrailError, RetryPolicy

__all__ = ["AsyncClient", "Client", "FlowtrailError", "RetryPolicy"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from flowtrail import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
