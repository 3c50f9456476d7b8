"""A fake Shopify-compatible shop: a real HTTP server on loopback, for tests.

It serves the Admin REST calls Loadout makes (``POST orders.json``,
``POST orders/{id}/cancel.json``, ``GET orders/{id}.json``), checks the
access token, keeps its orders, and answers a repeated ``Idempotency-Key``
(and, unless told not to, a repeated ``loadout_order`` note attribute) with
the order it already made. It can be told to fail or slow down, and it sends
real signed webhooks (``ship``, ``cancel``) to ``webhook_url``.

It runs in a thread of its own (uvicorn + starlette), so it keeps answering
while a test blocks its event loop (a subprocess, a ``kill -9``)::

    async with FakeShop() as shop:            # or: with FakeShop() as shop:
        shop.webhook_url = f"http://127.0.0.1:{http_port}/v1/webhooks/shopify"
        ... LOADOUT_SHOPIFY_URL=shop.url, LOADOUT_SHOPIFY_TOKEN=shop.token,
            LOADOUT_SHOPIFY_WEBHOOK_SECRET=shop.webhook_secret ...
        await shop.ship(shop.shop_order_of(order), "UPS", "1Z999", "https://ups.example/1Z999")
        assert shop.orders_for(order) == 1
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.signatures import shopify_sign
from server.webhook_events import ORDER_ATTRIBUTE

__all__ = ["Delivery", "FakeShop", "ThreadedServer"]

API = "/admin/api/{version}"
#: The shop's error bodies, as Shopify words them.
UNAUTHORIZED = "[API] Invalid API key or access token (unrecognized login or wrong password)"


class ThreadedServer:
    """An ASGI app served by uvicorn on a free loopback port, in a thread."""

    def __init__(self, app: Any) -> None:
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            access_log=False,
            lifespan="off",
            loop="asyncio",
            http="h11",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fake-http", daemon=True)
        self.url = ""

    def start(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the fake HTTP server did not start")
            time.sleep(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


@dataclass(frozen=True)
class Delivery:
    """One webhook the shop sent, and the receiver's answer."""

    topic: str
    webhook_id: str
    body: bytes
    headers: Mapping[str, str]
    status: int


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class FakeShop:
    def __init__(
        self,
        token: str = "shpat_fake_token",
        webhook_secret: str = "fake-webhook-secret",
        *,
        webhook_url: str | None = None,
        domain: str = "loadout-test.myshopify.com",
        dedupe_by_attribute: bool = True,
    ) -> None:
        self.token = token
        self.webhook_secret = webhook_secret
        self.webhook_url = webhook_url
        self.domain = domain
        self.dedupe_by_attribute = dedupe_by_attribute
        self.requests = 0  # admin requests received, failed ones included
        self.deliveries: list[Delivery] = []
        self._lock = threading.Lock()
        self._orders: dict[int, dict[str, Any]] = {}
        self._by_key: dict[str, int] = {}
        self._by_attribute: dict[str, int] = {}
        self._placements: Counter[str] = Counter()
        self._failures: list[int] = []
        self._delay = 0.0
        self._delay_after_work = True
        self._ids = itertools.count(5_600_000_000_001)
        self._numbers = itertools.count(1001)
        self._http = ThreadedServer(self._app())
        self.url = ""

    # -- running -------------------------------------------------------------

    def start(self) -> Self:
        self.url = self._http.start()
        return self

    def stop(self) -> None:
        self._http.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

    # -- what the test controls and reads -------------------------------------

    def fail_next(self, count: int, status: int = 500) -> None:
        """The next ``count`` admin requests get ``status``, and do nothing."""
        with self._lock:
            self._failures.extend([status] * count)

    def slow(self, seconds: float, *, after_work: bool = True) -> None:
        """Every admin request waits ``seconds`` before answering: after its
        work is done (the caller times out, yet the order exists) or before."""
        with self._lock:
            self._delay, self._delay_after_work = seconds, after_work

    def orders_for(self, order: str) -> int:
        """How many shop orders carry our ``order`` (exactly once: 1)."""
        with self._lock:
            return sum(_attribute(held) == order for held in self._orders.values())

    def placements(self, order: str) -> int:
        """How many order creations for our ``order`` arrived (repeats included)."""
        with self._lock:
            return self._placements[order]

    async def wait_for_placement(self, order: str, count: int = 1, timeout: float = 60) -> None:
        """Returns once ``count`` creations for ``order`` have arrived (say,
        to kill the caller while the shop, told to be ``slow``, holds its answer)."""
        deadline = time.monotonic() + timeout
        while self.placements(order) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} placements of {order} never arrived")
            await asyncio.sleep(0.02)

    def shop_order_of(self, order: str) -> str | None:
        with self._lock:
            found = [i for i, held in self._orders.items() if _attribute(held) == order]
        return str(found[0]) if found else None

    def order(self, shop_order: str | int) -> dict[str, Any]:
        """A copy of the shop's order (``KeyError`` if it has none)."""
        with self._lock:
            return copy.deepcopy(self._orders[int(shop_order)])

    def all_orders(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(list(self._orders.values()))

    # -- webhooks --------------------------------------------------------------

    async def ship(
        self,
        shop_order: str | int,
        carrier: str,
        number: str,
        url: str | None = None,
        *,
        topics: Sequence[str] = ("fulfillments/create", "orders/fulfilled"),
    ) -> list[Delivery]:
        """Fulfils the order with tracking, then sends ``topics`` (as a shop
        subscribed to both would: the receiver must take the second as a no-op)."""
        with self._lock:
            held = self._orders[int(shop_order)]
            fulfillment_id = next(self._ids)
            fulfillment = {
                "id": fulfillment_id,
                "admin_graphql_api_id": f"gid://shopify/Fulfillment/{fulfillment_id}",
                "order_id": held["id"],
                "name": f"{held['name']}.{len(held['fulfillments']) + 1}",
                "status": "success",
                "service": "manual",
                "shipment_status": None,
                "created_at": _now(),
                "updated_at": _now(),
                "tracking_company": carrier,
                "tracking_number": number,
                "tracking_numbers": [number],
                "tracking_url": url,
                "tracking_urls": [url] if url else [],
                "email": held.get("email"),
                "destination": held.get("shipping_address"),
                "line_items": held["line_items"],
            }
            held["fulfillments"].append(fulfillment)
            held["fulfillment_status"] = "fulfilled"
            held["updated_at"] = _now()
            payloads = {
                topic: copy.deepcopy(fulfillment if topic.startswith("fulfillments/") else held)
                for topic in topics
            }
        return [await self.deliver(topic, payload) for topic, payload in payloads.items()]

    async def cancel(self, shop_order: str | int, reason: str = "customer") -> Delivery:
        """Cancels the order at the shop and sends ``orders/cancelled``."""
        with self._lock:
            held = self._orders[int(shop_order)]
            _cancel(held, reason)
            payload = copy.deepcopy(held)
        return await self.deliver("orders/cancelled", payload)

    async def deliver(
        self, topic: str, payload: Mapping[str, Any], *, webhook_id: str | None = None
    ) -> Delivery:
        """Sends one signed webhook to ``webhook_url`` (a fresh id unless given)."""
        raw = json.dumps(payload).encode()
        headers = {
            "Content-Type": "application/json",
            "X-Shopify-Topic": topic,
            "X-Shopify-Hmac-Sha256": shopify_sign(raw, self.webhook_secret),
            "X-Shopify-Webhook-Id": webhook_id or str(uuid.uuid4()),
            "X-Shopify-Event-Id": str(uuid.uuid4()),
            "X-Shopify-Shop-Domain": self.domain,
            "X-Shopify-API-Version": "2024-10",
            "X-Shopify-Triggered-At": _now(),
        }
        return await self._post(topic, raw, headers)

    async def redeliver(self, delivery: Delivery) -> Delivery:
        """Sends ``delivery`` again, same id and body (Shopify retries so)."""
        return await self._post(delivery.topic, delivery.body, dict(delivery.headers))

    async def _post(self, topic: str, raw: bytes, headers: dict[str, str]) -> Delivery:
        if not self.webhook_url:
            raise RuntimeError("FakeShop.webhook_url is not set")
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.post(self.webhook_url, content=raw, headers=headers)
        delivery = Delivery(
            topic, headers["X-Shopify-Webhook-Id"], raw, headers, response.status_code
        )
        self.deliveries.append(delivery)
        return delivery

    # -- the Admin REST API ----------------------------------------------------

    def _app(self) -> Starlette:
        return Starlette(
            routes=[
                Route(f"{API}/orders.json", self._admin(self._create), methods=["POST"]),
                Route(f"{API}/orders/{{id:int}}.json", self._admin(self._get), methods=["GET"]),
                Route(
                    f"{API}/orders/{{id:int}}/cancel.json",
                    self._admin(self._cancel_call),
                    methods=["POST"],
                ),
            ]
        )

    def _admin(
        self, work: Callable[[Request, Any], Response]
    ) -> Callable[[Request], Awaitable[Response]]:
        """Counting, failures on demand, the token, delays; then ``work``."""

        async def endpoint(request: Request) -> Response:
            raw = await request.body()
            with self._lock:
                self.requests += 1
                failure = self._failures.pop(0) if self._failures else None
                delay, after_work = self._delay, self._delay_after_work
            if failure is not None:
                return JSONResponse({"errors": "Internal Server Error"}, failure)
            if request.headers.get("x-shopify-access-token") != self.token:
                return JSONResponse({"errors": UNAUTHORIZED}, 401)
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                return JSONResponse({"errors": "bad JSON"}, 400)
            if delay and not after_work:
                await asyncio.sleep(delay)
            with self._lock:
                response = work(request, body)
            if delay and after_work:
                await asyncio.sleep(delay)
            return response

        return endpoint

    def _create(self, request: Request, body: Any) -> Response:
        order = body.get("order") if isinstance(body, dict) else None
        items = order.get("line_items") if isinstance(order, dict) else None
        if not isinstance(order, dict) or not isinstance(items, list) or not items:
            return JSONResponse({"errors": {"line_items": ["must have at least one"]}}, 422)
        if not all(isinstance(i, dict) and isinstance(i.get("quantity"), int) for i in items):
            return JSONResponse({"errors": {"line_items": ["quantity is required"]}}, 422)
        key = request.headers.get("idempotency-key")
        attribute = _attribute(order)
        if attribute is not None:
            self._placements[attribute] += 1
        existing = self._by_key.get(key) if key else None
        if existing is None and attribute is not None and self.dedupe_by_attribute:
            existing = self._by_attribute.get(attribute)
        if existing is None:
            existing = self._store(order)
        if key:
            self._by_key.setdefault(key, existing)
        if attribute is not None:
            self._by_attribute.setdefault(attribute, existing)
        return JSONResponse({"order": self._orders[existing]}, 201)

    def _store(self, order: dict[str, Any]) -> int:
        shop_order, number = next(self._ids), next(self._numbers)
        self._orders[shop_order] = {
            **order,
            "id": shop_order,
            "admin_graphql_api_id": f"gid://shopify/Order/{shop_order}",
            "name": f"#{number}",
            "order_number": number,
            "created_at": _now(),
            "updated_at": _now(),
            "cancelled_at": None,
            "cancel_reason": None,
            "closed_at": None,
            "fulfillment_status": None,
            "fulfillments": [],
            "financial_status": order.get("financial_status", "pending"),
            "line_items": [
                {**item, "id": next(self._ids), "fulfillable_quantity": item["quantity"]}
                for item in order["line_items"]
            ],
        }
        return shop_order

    def _get(self, request: Request, body: Any) -> Response:
        held = self._orders.get(request.path_params["id"])
        if held is None:
            return JSONResponse({"errors": "Not Found"}, 404)
        return JSONResponse({"order": held})

    def _cancel_call(self, request: Request, body: Any) -> Response:
        held = self._orders.get(request.path_params["id"])
        if held is None:
            return JSONResponse({"errors": "Not Found"}, 404)
        if held["cancelled_at"] is not None:
            return JSONResponse({"error": "Order has already been cancelled"}, 422)
        if held["fulfillment_status"] == "fulfilled":
            return JSONResponse({"error": "Cannot cancel a fulfilled order"}, 422)
        reason = body.get("reason") if isinstance(body, dict) else None
        _cancel(held, reason if isinstance(reason, str) else "other")
        return JSONResponse({"order": held})


def _attribute(order: Mapping[str, Any]) -> str | None:
    """Our order id in a Shopify order's ``note_attributes``."""
    for attribute in order.get("note_attributes") or ():
        if isinstance(attribute, dict) and attribute.get("name") == ORDER_ATTRIBUTE:
            value = attribute.get("value")
            return value if isinstance(value, str) else None
    return None


def _cancel(held: dict[str, Any], reason: str) -> None:
    held["cancelled_at"] = held["updated_at"] = _now()
    held["cancel_reason"] = reason
    held["closed_at"] = held["cancelled_at"]
