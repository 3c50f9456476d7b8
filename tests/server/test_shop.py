"""The shop client (server/shop.py) against the fake Shopify-compatible shop
(tests/fakeshop.py), both real HTTP on loopback; and the fake shop's webhooks
checked with server/signatures.py and parsed with server/webhook_events.py."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.shop import ShopClient, ShopError, order_body, shipping_address
from server.signatures import shopify_valid
from server.webhook_events import ShopEvent, Tracking, parse_shop_event
from tests.fakeshop import FakeShop, ThreadedServer

ADDRESS: dict[str, str | None] = {
    "name": "Ada King Lovelace",
    "line1": "12 St James's Square",
    "line2": None,
    "city": "London",
    "region": None,
    "postal_code": "SW1Y 4JH",
    "country": "GB",
}


@pytest.fixture
def shop() -> Iterator[FakeShop]:
    with FakeShop() as running:
        yield running


@pytest.fixture
async def client(shop: FakeShop) -> AsyncIterator[ShopClient]:
    async with ShopClient(shop.url, shop.token, timeout=10) as running:
        yield running


async def place(client: ShopClient, order: str = "o-1") -> str:
    return await client.place_order(order, "hoodie", 2, "ada@example.com", ADDRESS, title="Hoodie")


def test_our_address_in_shopifys_fields() -> None:
    assert shipping_address(ADDRESS) == {
        "name": "Ada King Lovelace",
        "first_name": "Ada King",
        "last_name": "Lovelace",
        "address1": "12 St James's Square",
        "city": "London",
        "zip": "SW1Y 4JH",
        "country_code": "GB",
    }
    assert shipping_address({"name": "Cher", "line2": "Flat 2", "region": "CA"}) == {
        "name": "Cher",
        "last_name": "Cher",
        "address2": "Flat 2",
        "province": "CA",
    }


def test_the_order_body_names_our_order_and_is_paid() -> None:
    body = order_body("o-9", "mug", 1, None, {})["order"]
    assert body["note_attributes"] == [{"name": "loadout_order", "value": "o-9"}]
    assert body["financial_status"] == "paid"
    assert body["line_items"] == [
        {"title": "mug", "sku": "mug", "quantity": 1, "price": "0.00", "requires_shipping": True}
    ]
    assert "email" not in body and "shipping_address" not in body


async def test_an_order_is_placed_at_the_shop(shop: FakeShop, client: ShopClient) -> None:
    shop_order = await place(client)
    held = shop.order(shop_order)
    assert str(held["id"]) == shop_order
    assert held["email"] == "ada@example.com"
    assert held["financial_status"] == "paid"
    assert held["note_attributes"] == [{"name": "loadout_order", "value": "o-1"}]
    [item] = held["line_items"]
    assert (item["sku"], item["quantity"], item["title"]) == ("hoodie", 2, "Hoodie")
    assert held["shipping_address"]["address1"] == "12 St James's Square"
    assert held["shipping_address"]["country_code"] == "GB"
    assert shop.shop_order_of("o-1") == shop_order


async def test_placing_again_returns_the_same_order_by_idempotency_key() -> None:
    # The shop dedupes by the key alone here: the client's header does it.
    with FakeShop(dedupe_by_attribute=False) as shop:
        async with ShopClient(shop.url, shop.token) as client:
            first = await place(client, "o-1")
            again = await place(client, "o-1")
            other = await place(client, "o-2")
    assert first == again != other
    assert (shop.placements("o-1"), shop.orders_for("o-1"), len(shop.all_orders())) == (2, 1, 2)


async def test_a_server_error_is_retryable_and_the_retry_places_once(
    shop: FakeShop, client: ShopClient
) -> None:
    shop.fail_next(2, status=500)
    for _ in range(2):
        with pytest.raises(ShopError) as caught:
            await place(client)
        assert (caught.value.retryable, caught.value.status) == (True, 500)
    assert shop.orders_for("o-1") == 0
    await place(client)
    assert shop.orders_for("o-1") == 1


async def test_too_many_requests_is_retryable(shop: FakeShop, client: ShopClient) -> None:
    shop.fail_next(1, status=429)
    with pytest.raises(ShopError) as caught:
        await place(client)
    assert (caught.value.retryable, caught.value.status) == (True, 429)


@pytest.mark.parametrize("status", [400, 403, 404, 422])
async def test_other_client_errors_are_not_retryable(
    shop: FakeShop, client: ShopClient, status: int
) -> None:
    shop.fail_next(1, status=status)
    with pytest.raises(ShopError) as caught:
        await place(client)
    assert (caught.value.retryable, caught.value.status) == (False, status)


async def test_a_bad_token_is_refused_for_good(shop: FakeShop) -> None:
    async with ShopClient(shop.url, "shpat_wrong") as client:
        with pytest.raises(ShopError) as caught:
            await place(client)
    assert (caught.value.retryable, caught.value.status) == (False, 401)
    assert "shpat_wrong" not in str(caught.value) and "shpat_wrong" not in repr(client)
    assert shop.all_orders() == []


async def test_a_timeout_after_the_shop_acted_is_retried_without_a_second_order(
    shop: FakeShop,
) -> None:
    # The order is made, the answer is late: the caller cannot tell; its
    # retry with the same order id finds the same shop order.
    shop.slow(2.0, after_work=True)
    async with ShopClient(shop.url, shop.token, timeout=0.5) as impatient:
        with pytest.raises(ShopError) as caught:
            await place(impatient)
    assert caught.value.retryable
    await shop.wait_for_placement("o-1")
    assert shop.orders_for("o-1") == 1
    shop.slow(0)
    async with ShopClient(shop.url, shop.token) as client:
        again = await place(client)
    assert again == shop.shop_order_of("o-1")
    assert (shop.placements("o-1"), shop.orders_for("o-1")) == (2, 1)


async def test_a_refused_connection_is_retryable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with ShopClient(f"http://127.0.0.1:{port}", "t") as client:
        with pytest.raises(ShopError) as caught:
            await place(client)
    assert caught.value.retryable and caught.value.status is None


async def test_an_order_is_cancelled_once_and_cancelling_again_is_fine(
    shop: FakeShop, client: ShopClient
) -> None:
    shop_order = await place(client)
    await client.cancel_order(shop_order)
    assert shop.order(shop_order)["cancelled_at"] is not None
    await client.cancel_order(shop_order)  # the shop says 422 "already cancelled"
    assert shop.order(shop_order)["cancelled_at"] is not None


async def test_what_cannot_be_cancelled_is_a_permanent_error(
    shop: FakeShop, client: ShopClient
) -> None:
    with pytest.raises(ShopError) as caught:
        await client.cancel_order("123")
    assert (caught.value.retryable, caught.value.status) == (False, 404)
    shop_order = await place(client)
    await shop.ship(shop_order, "UPS", "1Z1", topics=())  # shipped, no webhook sent
    with pytest.raises(ShopError) as caught:
        await client.cancel_order(shop_order)
    assert (caught.value.retryable, caught.value.status) == (False, 422)


# -- the shop's webhooks -----------------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    raw: bytes


@dataclass
class Receiver:
    """Our side of the webhooks, for this test: keeps what arrives."""

    received: list[Received] = field(default_factory=list)

    async def endpoint(self, request: Request) -> Response:
        self.received.append(Received(dict(request.headers), await request.body()))
        return Response(status_code=200)


@pytest.fixture
def receiver(shop: FakeShop) -> Iterator[Receiver]:
    receiver = Receiver()
    app = Starlette(routes=[Route("/v1/webhooks/shopify", receiver.endpoint, methods=["POST"])])
    http = ThreadedServer(app)
    shop.webhook_url = f"{http.start()}/v1/webhooks/shopify"
    try:
        yield receiver
    finally:
        http.stop()


def event_of(shop: FakeShop, received: Received) -> ShopEvent:
    headers = received.headers
    assert shopify_valid(received.raw, headers["x-shopify-hmac-sha256"], shop.webhook_secret)
    assert not shopify_valid(received.raw, headers["x-shopify-hmac-sha256"], "another secret")
    assert headers["x-shopify-shop-domain"] == shop.domain
    return parse_shop_event(
        headers["x-shopify-topic"], headers["x-shopify-webhook-id"], received.raw
    )


async def test_shipping_sends_signed_webhooks_we_understand(
    shop: FakeShop, client: ShopClient, receiver: Receiver
) -> None:
    shop_order = await place(client, "o-7")
    deliveries = await shop.ship(shop_order, "UPS", "1Z999", "https://ups.example/1Z999")
    assert [d.status for d in deliveries] == [200, 200]
    created, fulfilled = (event_of(shop, r) for r in receiver.received)
    tracking = Tracking("UPS", "1Z999", "https://ups.example/1Z999")
    assert (created.topic, created.kind, created.shop_order, created.order) == (
        "fulfillments/create",
        "shipped",
        shop_order,
        None,
    )
    assert created.tracking == tracking
    assert (fulfilled.topic, fulfilled.kind, fulfilled.shop_order, fulfilled.order) == (
        "orders/fulfilled",
        "shipped",
        shop_order,
        "o-7",
    )
    assert fulfilled.tracking == tracking
    assert created.webhook != fulfilled.webhook


async def test_cancelling_sends_a_webhook_and_a_redelivery_keeps_its_id(
    shop: FakeShop, client: ShopClient, receiver: Receiver
) -> None:
    shop_order = await place(client, "o-8")
    delivery = await shop.cancel(shop_order)
    await shop.redeliver(delivery)
    first, again = (event_of(shop, r) for r in receiver.received)
    assert first == again
    assert (first.topic, first.kind, first.order, first.shop_order) == (
        "orders/cancelled",
        "cancelled",
        "o-8",
        shop_order,
    )
    assert shop.order(shop_order)["cancelled_at"] is not None
