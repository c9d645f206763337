"""The flow registry: every published flow version, followed from the flows topic by the shared follower
(`services/common/flowfollow.py`). A run is decided on the version it started with, so none is ever dropped."""

from __future__ import annotations

from schemas.events import FlowEventBase, FlowVersionPublished
from schemas.flows import FlowDefinition
from services.common.flowfollow import FlowFollower


class FlowRegistry(FlowFollower):
    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(bootstrap, topic)
        self.versions: dict[tuple[str, str, int], FlowDefinition] = {}

    def take(self, event: FlowEventBase) -> None:
        super().take(event)
        if isinstance(event, FlowVersionPublished):
            self.versions[(event.tenant_id, event.flow_id, event.flow_version)] = event.flow

    def get(self, tenant_id: str, flow_id: str, version: int | None) -> FlowDefinition | None:
        """That version of the flow; None for the latest version."""
        if version is None:
            latest = self.latest.get((tenant_id, flow_id))
            if latest is None:
                return None
            version = latest.version
        return self.versions.get((tenant_id, flow_id, version))
