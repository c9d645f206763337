"""Flowtrail's public Python surface: `flowtrail.client` for the HTTP API (docs/client.md) and `flowtrail.ledger`
for jobs that read the ledger itself (docs/ledger.md)."""

from __future__ import annotations

from flowtrail.client import AsyncClient, Client, FlowtrailError, RetryPolicy

__all__ = ["AsyncClient", "Client", "FlowtrailError", "RetryPolicy"]
