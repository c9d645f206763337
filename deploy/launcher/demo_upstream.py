"""The systems the seed demo flows talk to, on loopback: a Shopify-like shop, a NetSuite-like ERP, a users API
and a warehouse. `flowtrail demo` serves them while it runs; nothing leaves the machine."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

DEMO_UPSTREAM_PORT = 8704
SHOP_ORDERS = "/shopify/admin/api/2024-10/orders"
NETSUITE_SALES_ORDERS = "/netsuite/services/rest/record/v1/salesOrder"
REFUSED_ORDER = 1003  # placed without a customer email: NetSuite refuses it, so the sync ends PARTIAL
PAGE_SIZE = 2


def shop_order(number: int, updated_at: datetime, email: str | None) -> dict[str, Any]:
    """An order as Shopify's Admin API lists it (ids are Shopify's numbers, not the order number)."""
    return {"id": 450789469 + number, "order_number": number, "name": f"#{number}", "email": email,
            "financial_status": "paid", "total_price": f"{number / 10:.2f}", "currency": "USD",
            "created_at": (updated_at - timedelta(minutes=5)).isoformat(), "updated_at": updated_at.isoformat(),
            "customer": {"first_name": "Ada", "last_name": "Lovelace"}}  # fmt: skip


def _within(order: dict[str, Any], low: str | None, high: str | None) -> bool:
    at = datetime.fromisoformat(order["updated_at"])
    return (low is None or at >= datetime.fromisoformat(low)) and (high is None or at <= datetime.fromisoformat(high))


@dataclass
class DemoUpstream:
    """In-memory state of the fake systems; `fix_refused_order` is what a person would do in Shopify."""

    orders: dict[int, dict[str, Any]] = field(default_factory=dict)
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    sales_orders: dict[str, str] = field(default_factory=dict)  # Idempotency-Key → NetSuite internal id
    shipments: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def seeded(cls, now: datetime | None = None) -> DemoUpstream:
        # Stamped when the demo starts: later than any window an earlier demo's sync read, so each demo syncs them.
        now = now or datetime.now(UTC)
        emails = {n: None if n == REFUSED_ORDER else "ada@example.com" for n in range(1001, 1006)}
        orders = [shop_order(n, now - timedelta(milliseconds=1005 - n), email) for n, email in emails.items()]
        return cls(orders={o["id"]: o for o in orders})

    def fix_refused_order(self) -> None:
        """Add the customer's email in the shop; Shopify moves the order's updated_at on, as any edit does."""
        order = next(o for o in self.orders.values() if o["order_number"] == REFUSED_ORDER)
        order.update(email="grace@example.com", updated_at=datetime.now(UTC).isoformat())

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(SHOP_ORDERS + ".json", self._list_orders)
        app.router.add_get(SHOP_ORDERS + "/{number}.json", self._get_order)
        app.router.add_post(NETSUITE_SALES_ORDERS, self._create_sales_order)
        app.router.add_post("/api/users", self._create_user)
        app.router.add_get("/api/users/{id}", self._get_user)
        app.router.add_post("/warehouse/shipments", self._ship)
        return app

    async def _list_orders(self, request: web.Request) -> web.Response:
        """Orders updated in [updated_at_min, updated_at_max] (Shopify's bounds), oldest first, paged."""
        low, high = request.query.get("updated_at_min"), request.query.get("updated_at_max")
        selected = sorted((o for o in self.orders.values() if _within(o, low, high)),
                          key=lambda o: (o["updated_at"], o["id"]))  # fmt: skip
        start = int(request.query.get("page_info", "0"))
        following = str(start + PAGE_SIZE) if start + PAGE_SIZE < len(selected) else None
        return web.json_response({"orders": selected[start : start + PAGE_SIZE], "next_page_info": following})

    async def _get_order(self, request: web.Request) -> web.Response:
        number = request.match_info["number"]
        found = next((o for o in self.orders.values() if str(o["order_number"]) == number), None)
        return web.json_response({"order": found}) if found else web.json_response({"errors": "Not Found"}, status=404)

    async def _create_sales_order(self, request: web.Request) -> web.Response:
        body = await request.json()
        if not body.get("email"):  # NetSuite's REST API refuses with RFC 9457 problem details
            detail = {"detail": "Please enter value(s) for: Customer Email", "o:errorPath": "email",
                      "o:errorCode": "USER_ERROR"}  # fmt: skip
            return web.json_response({"title": "Bad Request", "status": 400, "o:errorDetails": [detail]}, status=400)
        key = request.headers.get("Idempotency-Key", str(len(self.sales_orders)))
        return web.json_response({"id": self.sales_orders.setdefault(key, str(9000 + len(self.sales_orders)))},
                                 status=201)  # fmt: skip

    async def _create_user(self, request: web.Request) -> web.Response:
        user = {"id": f"usr_{len(self.users) + 1:04d}", **await request.json()}
        self.users[user["id"]] = user
        return web.json_response(user, status=201)

    async def _get_user(self, request: web.Request) -> web.Response:
        user = self.users.get(request.match_info["id"])
        return web.json_response(user) if user else web.json_response({"error": "no such user"}, status=404)

    async def _ship(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.shipments.append(body)
        return web.json_response({"shipment_id": f"shp_{len(self.shipments)}", **body}, status=201)


async def serve(upstream: DemoUpstream, port: int = DEMO_UPSTREAM_PORT) -> web.AppRunner:
    """Listen on 127.0.0.1:`port`; the caller cleans the runner up."""
    runner = web.AppRunner(upstream.app(), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
    except OSError:
        await runner.cleanup()
        raise
    return runner
