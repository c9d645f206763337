"""The connectors a step may name: the shared registry (services/common/connectors.py), fed by the tenant's own
connectors and the operator's `FLOWTRAIL_EXECUTOR_CONNECTORS`."""

from __future__ import annotations

from services.common.connectors import ConnectorRegistry, Resolved, as_registry

__all__ = ["ConnectorRegistry", "Resolved", "as_registry"]
