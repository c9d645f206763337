"""API settings: `FLOWTRAIL_API_…` on top of the shared `FLOWTRAIL_…` ones."""

from __future__ import annotations

from services.common.settings import DEFAULT_API_PORT, CommonSettings, service_field


class ApiSettings(CommonSettings):
    host: str = service_field("api", "host", "127.0.0.1")
    port: int = service_field("api", "port", DEFAULT_API_PORT)
    pool_max_size: int = service_field("api", "pool_max_size", 10)
    # Webhook receivers on private or loopback addresses: local development only.
    webhook_allow_private_networks: bool = service_field("api", "webhook_allow_private_networks", False)
