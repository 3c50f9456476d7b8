"""Fulfillment against the outside world over real sockets (PROTOCOL.md §12):
a Shopify-compatible shop that is a real HTTP server on loopback (it receives
the server's orders and sends it real signed webhooks), an SMTP server that
cannot be reached (orders fail, gems come back, an operator retries), and a
``kill -9`` between the shop's call and recording its answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from protocol.messages import Role
from tests.e2e.support import Client, ServerProcess, free_port, fund, new_user
from tests.fakeshop import FakeShop

ADDRESS = {"name": "Grace Hopper", "line1": "2 Cobol Way", "city": "Arlington",
           "region": "VA", "postal_code": "22201", "country": "US"}  # fmt: skip
SHIRT = {"type": "purchase", "sku": "merch.tshirt.logo", "price": 3000}
VOUCHER = {"type": "purchase", "sku": "plat.voucher.steam10", "price": 2000}


@pytest.fixture
def shop() -> Iterator[FakeShop]:
    with FakeShop() as running:
        yield running


def _serve(shop: FakeShop, data: Path, ray_address: str, lease: float = 30.0) -> ServerProcess:
    env = {
        "LOADOUT_SHOPIFY_URL": shop.url,
        "LOADOUT_SHOPIFY_TOKEN": shop.token,
        "LOADOUT_SHOPIFY_WEBHOOK_SECRET": shop.webhook_secret,
        "LOADOUT_SMTP_URL": f"smtp://127.0.0.1:{free_port()}",  # nothing listens there
        "LOADOUT_FULFILLMENT_ATTEMPTS": "3",
        "LOADOUT_FULFILLMENT_BACKOFF": "0.2",
        "LOADOUT_FULFILLMENT_LEASE": str(lease),
    }
    return ServerProcess(data, ray_address, env)


async def _order_status(c: Client, order: str, wanted: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        entries = (await c.request({"type": "orders"}))["entries"]
        found = [e for e in entries if e["order"] == order]
        if found and found[0]["status"] == wanted:
            return found[0]
        assert time.monotonic() < deadline, f"order {order} never became {wanted}: {found}"
        await asyncio.sleep(0.2)


def _order_of(bought: dict[str, Any]) -> str:
    assert bought["type"] == "purchased", bought
    return "ord_" + str(bought["purchase"]).removeprefix("pur_")


async def test_merchandise_through_the_shop(
    shop: FakeShop, ray_address: str, tmp_path: Path
) -> None:
    server = _serve(shop, tmp_path / "data", ray_address).start()
    try:
        shop.webhook_url = f"http://127.0.0.1:{server.http_port}/v1/webhooks/shopify"
        user = new_user()
        await fund(server, user, 9000)
        async with await Client.open(server, user) as c, await Client.open(server, user) as d:
            await c.request({"type": "set_contact", "key": "c", "email": "grace@example.com",
                             "address": ADDRESS})  # fmt: skip
            shop.fail_next(1, 503)  # the first call fails: retried after the backoff
            order = _order_of(await c.request({**SHIRT, "key": "s1"}))
            placed = await d.push("fulfillment", order=order, status="processing", timeout=30)
            assert placed["sku"] == "merch.tshirt.logo"
            shop_order = shop.shop_order_of(order)
            assert shop_order is not None and shop.orders_for(order) == 1
            held = shop.order(shop_order)
            assert held["shipping_address"]["country_code"] == "US"
            deliveries = await shop.ship(shop_order, "USPS", "9400", "https://usps.example/9400")
            assert [x.status for x in deliveries] == [200, 200]
            shipped = await d.push("fulfillment", order=order, status="shipped")
            assert shipped["tracking"] == {"carrier": "USPS", "number": "9400",
                                           "url": "https://usps.example/9400"}  # fmt: skip
            entry = await _order_status(c, order, "shipped")
            before = await c.request({"type": "state"})
            again = await shop.redeliver(deliveries[0])  # the same webhook id: nothing changes
            assert again.status == 200
            assert (await c.request({"type": "state"}))["version"] == before["version"]
            assert entry["attempts"] == 2

            # The shop cancels a second order: the gems come back.
            second = _order_of(await c.request({**SHIRT, "key": "s2"}))
            await d.push("fulfillment", order=second, status="processing", timeout=30)
            balance = (await c.request({"type": "state"}))["balance"]
            cancel = await shop.cancel(shop.shop_order_of(second) or "")
            assert cancel.status == 200
            await d.push("fulfillment", order=second, status="cancelled")
            assert (await c.request({"type": "state"}))["balance"] == balance + 3000

            # The player cancels a third order the shop holds: the shop is told.
            third = _order_of(await c.request({**SHIRT, "key": "s3"}))
            await d.push("fulfillment", order=third, status="processing", timeout=30)
            mine = await c.request({"type": "cancel_order", "key": "x3", "order": third})
            assert mine["type"] == "order_cancelled" and mine["refunded"] == 3000
            held = shop.shop_order_of(third) or ""
            deadline = time.monotonic() + 30
            while shop.order(held).get("cancelled_at") is None:
                assert time.monotonic() < deadline, "the shop was never told of the cancel"
                await asyncio.sleep(0.2)

            # A forged webhook is refused and changes nothing.
            async with httpx.AsyncClient() as http:
                forged = await http.post(
                    shop.webhook_url, content=b'{"id": 1}',
                    headers={"X-Shopify-Hmac-Sha256": "bm9wZQ==", "X-Shopify-Topic":
                             "orders/cancelled", "X-Shopify-Webhook-Id": "w-forged"},
                )  # fmt: skip
            assert forged.status_code == 401

            # Email cannot be sent: after 3 attempts the order fails and refunds.
            funds = (await c.request({"type": "state"}))["balance"]
            voucher = _order_of(await c.request({**VOUCHER, "key": "v1"}))
            failed = await d.push("fulfillment", order=voucher, status="failed", timeout=30)
            assert failed["voucher"] is None
            entry = await _order_status(c, voucher, "failed")
            assert entry["attempts"] == 3
            assert (await c.request({"type": "state"}))["balance"] == funds
            async with await Client.open(server, "ops", role=Role.ADMIN) as admin:
                retried = await admin.request({"type": "retry_order", "order": voucher})
                assert retried["status"] == "pending", retried
            await d.push("fulfillment", order=voucher, status="pending")
            await d.push("fulfillment", order=voucher, status="failed", timeout=30)
            history = await c.request({"type": "history", "limit": 4})
            assert [(e["kind"], e["amount"]) for e in history["entries"]] == [
                ("refund", 2000), ("purchase", -2000), ("refund", 2000), ("purchase", -2000),
            ]  # fmt: skip
    finally:
        server.kill()
        server.kill_actors()


async def test_kill_between_the_shop_call_and_its_answer(
    shop: FakeShop, ray_address: str, tmp_path: Path
) -> None:
    server = _serve(shop, tmp_path / "data", ray_address, lease=2.0).start()
    try:
        user = new_user()
        await fund(server, user, 3000)
        async with await Client.open(server, user) as c:
            await c.request({"type": "set_contact", "key": "c", "address": ADDRESS})
            shop.slow(30, after_work=True)  # the shop makes the order, then holds its answer
            order = _order_of(await c.request({**SHIRT, "key": "s1"}))
            await shop.wait_for_placement(order)
        server.kill()  # kill -9 while the worker waits for the shop's answer
        shop.slow(0)
        server.start()
        async with await Client.open(server, user) as c:
            entry = await _order_status(c, order, "processing", timeout=60)
        assert shop.placements(order) == 2  # placed again after the restart...
        assert shop.orders_for(order) == 1  # ...and the shop holds one order
        assert entry["attempts"] == 2
    finally:
        server.kill()
        server.kill_actors()
