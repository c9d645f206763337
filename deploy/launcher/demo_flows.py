"""The demo flows `flowtrail up` publishes: one that succeeds and one that fails on purpose."""

from __future__ import annotations

from schemas.flows import FlowDefinition
from services.common.settings import DEFAULT_API_PORT, DEFAULT_INGEST_PORT

DEMO_TENANT = "demo"


def demo_flows(tenant_id: str = DEMO_TENANT) -> list[FlowDefinition]:
    ingest = f"http://127.0.0.1:{DEFAULT_INGEST_PORT}"
    api = f"http://127.0.0.1:{DEFAULT_API_PORT}"
    order_sync = {
        "id": "demo-order-sync",
        "tenant_id": tenant_id,
        "name": "Demo: order sync",
        "version": 1,
        "description": "Checks the upstream service, shapes the order from the trigger, waits for settlement.",
        "tags": ["demo", "orders"],
        "steps": [
            {
                "name": "check_upstream",
                "action": "http_request",
                "input": {"method": "GET", "url": f"{ingest}/healthz", "timeout_s": 5},
                "assertions": [{"expression": "status", "expected": 200}],
                "extract": {"upstream_status": "body.status"},
            },
            {
                "name": "shape_order",
                "action": "transform",
                "input": {
                    "output": {
                        "order_id": "{{ trigger.order_id }}",
                        "total_cents": "{{ trigger.total_cents }}",
                        "currency": "{{ trigger.currency || 'USD' }}",
                        "upstream": "{{ vars.upstream_status }}",
                    }
                },
            },
            {"name": "settle", "action": "delay", "input": {"seconds": 0.5}},
        ],
    }
    invoice_push = {
        "id": "demo-invoice-push",
        "tenant_id": tenant_id,
        "name": "Demo: invoice push (fails on purpose)",
        "version": 1,
        "description": "Pushes an invoice to an endpoint that rejects our credentials: an AUTH error, not retried.",
        "tags": ["demo", "invoices"],
        "steps": [
            {
                "name": "build_invoice",
                "action": "transform",
                "input": {"output": {"invoice_id": "{{ trigger.invoice_id }}", "amount": "{{ trigger.amount }}"}},
            },
            {
                "name": "push_invoice",
                "action": "http_request",
                "input": {
                    "method": "GET",
                    "url": f"{api}/v1/runs?limit=1",
                    "headers": {"Authorization": "Bearer ft_live_not-a-real-key-000000000000000000"},
                },
            },
            {"name": "confirm", "action": "delay", "input": {"seconds": 0.1}},
        ],
    }
    return [FlowDefinition.model_validate(order_sync), FlowDefinition.model_validate(invoice_push)]


def demo_inputs(flow_id: str, n: int) -> list[dict[str, object]]:
    if flow_id == "demo-order-sync":
        return [{"order_id": f"SO-{1040 + i}", "total_cents": 1250 * (i + 1), "currency": "EUR"} for i in range(n)]
    return [{"invoice_id": f"INV-{2200 + i}", "amount": 99.5 * (i + 1)} for i in range(n)]
