"""The demo flows `flowtrail up` publishes: one that succeeds, one that fails on purpose, and three modelled on
the product documents in docs/origins.md (an order sync ending PARTIAL, an API test, an approval) that call
the demo upstream on loopback."""

from __future__ import annotations

from typing import Any

from deploy.launcher.demo_upstream import DEMO_UPSTREAM_PORT, NETSUITE_SALES_ORDERS, REFUSED_ORDER, SHOP_ORDERS
from schemas.flows import FlowDefinition
from services.common.settings import DEFAULT_API_PORT, DEFAULT_INGEST_PORT

DEMO_TENANT = "demo"
ORDER_SYNC = "demo-shopify-netsuite-orders"
API_TEST = "demo-create-user-then-fetch"
APPROVAL = "demo-ship-on-approval"
WEBHOOK = "demo-shop-order-created"


def demo_flows(
    tenant_id: str = DEMO_TENANT,
    *,
    ingest: str = f"http://127.0.0.1:{DEFAULT_INGEST_PORT}",
    api: str = f"http://127.0.0.1:{DEFAULT_API_PORT}",
    upstream: str = f"http://127.0.0.1:{DEMO_UPSTREAM_PORT}",
) -> list[FlowDefinition]:
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
    order_created = {
        "id": WEBHOOK,
        "tenant_id": tenant_id,
        "name": "Demo: the shop's order-created webhook",
        "version": 1,
        "description": "The shop posts its own order-created event to the flow's hook URL (GET /v1/flows/{id}/hook): "
        "each delivery is one run of trigger type webhook, a redelivery of the same event id the same run.",
        "tags": ["demo", "webhook", "orders"],
        "trigger": {"type": "webhook", "delivery_id_path": "id"},
        "steps": [
            {
                "name": "label_order",
                "action": "transform",
                "input": {"output": {"order": "{{ trigger.name }}", "email": "{{ trigger.email }}"}},
            },
        ],
    }
    flows = [order_sync, invoice_push, order_created, *seed_flows(tenant_id, upstream)]
    return [FlowDefinition.model_validate(f) for f in flows]


def seed_flows(tenant_id: str, upstream: str) -> list[dict[str, Any]]:
    """The runs page's "Shopify → NetSuite Orders" sync, an executions-page API test, and an approval on human_input."""
    order_sync = {
        "id": ORDER_SYNC, "tenant_id": tenant_id, "name": "Shopify → NetSuite Orders", "version": 1,
        "description": "Sales orders from Shopify updated in the run's cursor window become NetSuite sales orders "
                       "and canonical orders (GET /api/public/data/order). NetSuite refuses an order without a "
                       "customer email: the run ends PARTIAL with that order's error; retrying it sends only that "
                       "order again.",
        "tags": ["demo", "sync", "shopify", "netsuite"],
        "steps": [{
            "name": "sync_orders", "action": "sync_records", "retry": {"delays_s": [1, 5]},
            "input": {
                "source": {"kind": "http", "url": upstream + SHOP_ORDERS + ".json", "records_path": "orders",
                           "next_page_path": "next_page_info", "cursor_param": "page_info",
                           "params": {"status": "any"}},
                "destination": {"kind": "http", "url": upstream + NETSUITE_SALES_ORDERS},
                "key": "id", "updated_at": "updated_at",
                "mapping": {"order_number": "to_string(order_number)", "status": "financial_status",
                            "total": "to_number(total_price)", "currency": "currency", "placed_at": "created_at",
                            "email": "email"},
                "required": ["order_number"],
                "entity": "order", "system": "shopify", "dest_system": "netsuite",
            },
        }],
    }  # fmt: skip
    api_test = {
        "id": API_TEST, "tenant_id": tenant_id, "name": "Create user then fetch it", "version": 1,
        "description": "An API test: create a user, assert the answer, extract its id, read it back.",
        "tags": ["demo", "api-test"],
        "steps": [
            {"name": "create_user", "action": "http_request",
             "input": {"method": "POST", "url": upstream + "/api/users",
                       "body": {"name": "Ada Lovelace", "email": "ada@example.com"}},
             "assertions": [{"expression": "status", "expected": 201},
                            {"expression": "body.id", "operator": "exists"}],
             "extract": {"user_id": "body.id"}},
            {"name": "fetch_user", "action": "http_request",
             "input": {"method": "GET", "url": upstream + "/api/users/{{ vars.user_id }}"},
             "assertions": [{"expression": "status", "expected": 200},
                            {"expression": "body.email", "expected": "ada@example.com"}]},
        ],
    }  # fmt: skip
    approval = {
        "id": APPROVAL, "tenant_id": tenant_id, "name": "Ship order on approval", "version": 1,
        "description": "Looks the order up, waits for a person to approve it (POST /v1/runs/{id}/resume/"
                       "{request_id}), then ships it with the carrier they chose.",
        "tags": ["demo", "approval"],
        "steps": [
            {"name": "prepare", "action": "http_request",
             "input": {"method": "GET", "url": upstream + SHOP_ORDERS + "/{{ trigger.order }}.json"},
             "assertions": [{"expression": "status", "expected": 200}],
             "extract": {"order_name": "body.order.name", "total": "body.order.total_price"}},
            {"name": "approve", "action": "human_input", "timeout_s": 86400,
             "input": {"question": "Ship order {{ vars.order_name }} ({{ vars.total }} USD)?",
                       "fields": ["approved", "carrier"]}},
            {"name": "ship", "action": "http_request", "run_condition": "steps.approve.output.approved",
             "input": {"method": "POST", "url": upstream + "/warehouse/shipments",
                       "body": {"order": "{{ vars.order_name }}", "carrier": "{{ steps.approve.output.carrier }}"}},
             "assertions": [{"expression": "status", "expected": 201}]},
        ],
    }  # fmt: skip
    return [order_sync, api_test, approval]


def demo_inputs(flow_id: str, n: int) -> list[dict[str, object]]:
    if flow_id in (ORDER_SYNC, API_TEST):
        return [{} for _ in range(n)]
    if flow_id == APPROVAL:
        return [{"order": REFUSED_ORDER + 1 + i} for i in range(n)]
    if flow_id == "demo-order-sync":
        return [{"order_id": f"SO-{1040 + i}", "total_cents": 1250 * (i + 1), "currency": "EUR"} for i in range(n)]
    return [{"invoice_id": f"INV-{2200 + i}", "amount": 99.5 * (i + 1)} for i in range(n)]
