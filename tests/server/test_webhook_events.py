"""Webhook bodies (server/webhook_events.py): Shopify-shaped and the payment provider's."""

from __future__ import annotations

import json
from typing import Any

import pytest

from protocol.messages import MAX_GEMS
from server.webhook_events import (
    BadEvent,
    Payment,
    ShopEvent,
    Tracking,
    parse_payment,
    parse_shop_event,
)


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


# Trimmed from Shopify's sample payloads: numeric ids, many fields we ignore.
FULFILLMENT = {
    "id": 123456,
    "order_id": 820982911946154508,
    "status": "success",
    "created_at": "2021-12-31T19:00:00-05:00",
    "service": "manual",
    "shipment_status": None,
    "location_id": 905684977,
    "tracking_company": "UPS",
    "tracking_number": "1Z2345",
    "tracking_numbers": ["1Z2345"],
    "tracking_url": "https://www.ups.com/WebTracking?loc=en_US&requester=ST&trackNums=1Z2345",
    "tracking_urls": ["https://www.ups.com/WebTracking?loc=en_US&requester=ST&trackNums=1Z2345"],
    "line_items": [{"id": 866550311766439020, "sku": "hoodie", "quantity": 1}],
}

ORDER = {
    "id": 820982911946154508,
    "email": "jon@example.com",
    "financial_status": "paid",
    "note_attributes": [
        {"name": "gift", "value": "no"},
        {"name": "loadout_order", "value": "o-42"},
    ],
    "fulfillments": [],
    "line_items": [{"sku": "hoodie", "quantity": 1, "title": "Hoodie"}],
}


def test_a_fulfillment_is_a_shipment_of_the_shops_order() -> None:
    for topic in ("fulfillments/create", "fulfillments/update"):
        event = parse_shop_event(topic, "w-1", body(FULFILLMENT))
        assert event == ShopEvent(
            webhook="w-1",
            topic=topic,
            order=None,
            shop_order="820982911946154508",
            kind="shipped",
            tracking=Tracking("UPS", "1Z2345", str(FULFILLMENT["tracking_url"])),
        )


def test_tracking_falls_back_to_the_lists_and_may_be_absent() -> None:
    listed = FULFILLMENT | {
        "tracking_company": None,
        "tracking_number": None,
        "tracking_url": None,
        "tracking_numbers": ["N1", "N2"],
        "tracking_urls": [],
    }
    event = parse_shop_event("fulfillments/create", "w", body(listed))
    assert event.tracking == Tracking(carrier="", number="N1", url=None)
    bare = {"order_id": "shop-7", "status": "success"}
    event = parse_shop_event("fulfillments/create", "w", body(bare))
    assert (event.kind, event.shop_order, event.tracking) == ("shipped", "shop-7", None)


@pytest.mark.parametrize("status", ["pending", "open", "cancelled", "error", "failure", None])
def test_a_fulfillment_that_shipped_nothing_is_ignored(status: str | None) -> None:
    event = parse_shop_event("fulfillments/update", "w", body(FULFILLMENT | {"status": status}))
    assert (event.kind, event.shop_order, event.tracking) == (
        "ignored",
        "820982911946154508",
        None,
    )


def test_an_order_fulfilled_carries_our_order_id_and_its_last_shipment() -> None:
    fulfillments = [
        FULFILLMENT | {"tracking_number": "OLD"},
        FULFILLMENT | {"tracking_number": "NEW", "tracking_company": "DHL"},
        FULFILLMENT | {"tracking_number": "VOID", "status": "cancelled"},
    ]
    event = parse_shop_event(
        "orders/fulfilled", "w-2", body(ORDER | {"fulfillments": fulfillments})
    )
    assert (event.order, event.shop_order, event.kind) == ("o-42", "820982911946154508", "shipped")
    assert event.tracking == Tracking("DHL", "NEW", str(FULFILLMENT["tracking_url"]))
    event = parse_shop_event("orders/fulfilled", "w-3", body(ORDER))
    assert (event.kind, event.tracking) == ("shipped", None)


def test_an_order_cancelled_carries_our_order_id() -> None:
    event = parse_shop_event("orders/cancelled", "w-4", body(ORDER | {"cancel_reason": "customer"}))
    assert event == ShopEvent("w-4", "orders/cancelled", "o-42", "820982911946154508", "cancelled")


def test_an_order_of_someone_else_has_no_order_id_of_ours() -> None:
    for notes in (
        None,
        [],
        [{"name": "loadout_order", "value": 42}],
        [{"name": "x", "value": "o"}],
    ):
        event = parse_shop_event("orders/cancelled", "w", body(ORDER | {"note_attributes": notes}))
        assert (event.order, event.shop_order, event.kind) == (
            None,
            "820982911946154508",
            "cancelled",
        )


def test_other_topics_are_ignored_without_reading_the_body() -> None:
    event = parse_shop_event("orders/create", "w-5", b"not even json")
    assert event == ShopEvent("w-5", "orders/create", None, None, "ignored")


@pytest.mark.parametrize(
    ("topic", "webhook", "raw"),
    [
        ("orders/cancelled", "w", b"not json"),
        ("orders/cancelled", "w", body([ORDER])),
        ("orders/cancelled", "w", body({"note_attributes": []})),
        ("orders/cancelled", "w", body(ORDER | {"id": -1})),
        ("orders/cancelled", "w", body(ORDER | {"id": "a\x00b"})),
        ("orders/fulfilled", "w", body(ORDER | {"fulfillments": {"x": 1}})),
        ("fulfillments/create", "w", body(FULFILLMENT | {"order_id": None})),
        ("fulfillments/create", "w", body({"status": "success"})),
        ("fulfillments/create", "w", body(FULFILLMENT | {"tracking_number": 7})),
        ("fulfillments/create", "w", body(FULFILLMENT | {"tracking_url": "x" * 3000})),
        ("orders/cancelled", None, body(ORDER)),
        ("orders/cancelled", "", body(ORDER)),
        ("orders/cancelled", "w\x00", body(ORDER)),
        (None, "w", body(ORDER)),
        ("", "w", body(ORDER)),
    ],
)
def test_a_bad_shop_webhook_is_a_clear_value_error(
    topic: str | None, webhook: str | None, raw: bytes
) -> None:
    with pytest.raises(BadEvent) as caught:
        parse_shop_event(topic, webhook, raw)
    assert isinstance(caught.value, ValueError)
    assert str(caught.value)


def test_a_bad_body_names_the_topic_and_the_field() -> None:
    with pytest.raises(BadEvent, match=r"fulfillments/create: .*\$\.tracking_number"):
        parse_shop_event("fulfillments/create", "w", body(FULFILLMENT | {"tracking_number": 7}))


PAYMENT = {
    "id": "evt_1",
    "type": "payment.succeeded",
    "transaction": "txn_9",
    "user": "alice",
    "gems": 500,
}


def test_a_payment() -> None:
    assert parse_payment(body(PAYMENT)) == Payment(
        "evt_1", "payment.succeeded", "txn_9", "alice", 500
    )
    refunded = parse_payment(body(PAYMENT | {"type": "payment.refunded", "extra": [1]}))
    assert refunded.type == "payment.refunded"
    assert parse_payment(body(PAYMENT | {"gems": MAX_GEMS})).gems == MAX_GEMS


@pytest.mark.parametrize(
    "change",
    [
        {"type": "payment.failed"},
        {"gems": 0},
        {"gems": -5},
        {"gems": MAX_GEMS + 1},
        {"gems": 1.5},
        {"gems": "10"},
        {"user": "not a user!"},
        {"user": "x" * 65},
        {"transaction": ""},
        {"transaction": "t\x00"},
        {"id": ""},
        {"id": None},
    ],
)
def test_a_bad_payment_is_a_clear_value_error(change: dict[str, Any]) -> None:
    with pytest.raises(BadEvent, match=r"^payment: "):
        parse_payment(body(PAYMENT | change))


@pytest.mark.parametrize(
    "raw", [b"", b"[]", b"{", body({k: v for k, v in PAYMENT.items() if k != "gems"})]
)
def test_a_malformed_payment_body_is_a_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError, match=r"^payment: "):
        parse_payment(raw)
