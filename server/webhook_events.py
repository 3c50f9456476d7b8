"""Inbound webhook bodies, parsed into what they mean to us (PROTOCOL.md §12).

Pure: bytes in, a typed event out. Signatures are checked before any of this
runs (``server/signatures.py``); a body that is signed but not what the topic
promises raises ``BadEvent`` (a ``ValueError``) with the offending path.

The shop's webhooks (Shopify-compatible)::

    fulfillments/create, fulfillments/update   a fulfillment: ``order_id`` is
        the *shop's* order id (our id is not in it); ``status`` "success" is a
        shipment, with ``tracking_company``, ``tracking_number``, ``tracking_url``
    orders/fulfilled                           an order, our id in its
        ``note_attributes`` (``loadout_order``); tracking from its last fulfillment
    orders/cancelled                           an order, cancelled at the shop
    anything else                              ignored (acknowledged, no change)

The payment provider's webhook: ``{"id", "type", "transaction", "user", "gems"}``
with ``type`` ``payment.succeeded`` or ``payment.refunded``.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

from protocol.base import PositiveGems, UserId

__all__ = [
    "ORDER_ATTRIBUTE",
    "SHOP_TOPICS",
    "BadEvent",
    "Payment",
    "ShopEvent",
    "Tracking",
    "parse_payment",
    "parse_shop_event",
]

#: The ``note_attributes`` entry that carries our order id at the shop.
ORDER_ATTRIBUTE: Final = "loadout_order"
#: The shop topics that can change an order; any other is ignored.
SHOP_TOPICS: Final = frozenset(
    {"fulfillments/create", "fulfillments/update", "orders/fulfilled", "orders/cancelled"}
)
#: The fulfillment status of a shipment. Shopify's others (``pending``,
#: ``open``: in progress; ``cancelled``, ``error``, ``failure``: ended without
#: one) ship nothing, and a cancelled fulfillment does not cancel the order.
_SHIPPED: Final = "success"

#: Text stored in PostgreSQL ``text`` columns, which cannot hold NUL.
_Text = Annotated[str, Meta(min_length=1, max_length=255, pattern=r"^[^\x00]*\Z")]
_Url = Annotated[str, Meta(max_length=2048, pattern=r"^[^\x00]*\Z")]
#: The shop's ids are JSON numbers in Shopify's REST bodies; strings are accepted.
_ShopId = Annotated[int, Meta(ge=0)] | _Text


class BadEvent(ValueError):
    """A webhook body (or its id or topic) that is not what it must be."""


class Tracking(Struct, frozen=True):
    """Where a shipment can be followed. ``carrier`` is "" when the shop named none."""

    carrier: str
    number: str
    url: str | None = None


class ShopEvent(Struct, frozen=True):
    """One shop webhook, as it concerns an order of ours.

    ``order`` is our order id when the body carries it (order topics),
    ``shop_order`` the shop's; a fulfillment names only the shop's order, so
    the receiver finds ours by the shop order id it recorded when placing it.
    """

    webhook: str
    topic: str
    order: str | None
    shop_order: str | None
    kind: Literal["shipped", "cancelled", "ignored"]
    tracking: Tracking | None = None


class Payment(Struct, frozen=True):
    """A payment provider's event: ``gems`` bought (or refunded) in ``transaction``."""

    id: _Text
    type: Literal["payment.succeeded", "payment.refunded"]
    transaction: _Text
    user: UserId
    gems: PositiveGems


# The shop's bodies: only the fields we read; the rest is ignored.
class _NoteAttribute(Struct):
    name: str
    value: str | int | float | bool | None = None


class _Fulfillment(Struct):
    order_id: _ShopId | None = None
    status: str | None = None
    tracking_company: Annotated[str, Meta(max_length=255)] | None = None
    tracking_number: Annotated[str, Meta(max_length=255)] | None = None
    tracking_numbers: list[Annotated[str, Meta(max_length=255)]] = []
    tracking_url: _Url | None = None
    tracking_urls: list[_Url] = []


class _Order(Struct):
    id: _ShopId
    note_attributes: list[_NoteAttribute] | None = None
    fulfillments: list[_Fulfillment] | None = None


_fulfillment_decoder: Final = msgspec.json.Decoder(_Fulfillment)
_order_decoder: Final = msgspec.json.Decoder(_Order)
_payment_decoder: Final = msgspec.json.Decoder(Payment)
_T = TypeVar("_T")


def _tracking(fulfillment: _Fulfillment) -> Tracking | None:
    number = fulfillment.tracking_number or next(iter(fulfillment.tracking_numbers), None)
    if not number:
        return None
    url = fulfillment.tracking_url or next(iter(fulfillment.tracking_urls), None)
    return Tracking(carrier=fulfillment.tracking_company or "", number=number, url=url or None)


def _our_order(order: _Order) -> str | None:
    for attribute in order.note_attributes or ():
        if attribute.name == ORDER_ATTRIBUTE and isinstance(attribute.value, str):
            value = attribute.value.strip()
            if value and "\x00" not in value and len(value) <= 255:
                return value
    return None


def _decode(decoder: msgspec.json.Decoder[_T], raw: bytes, topic: str) -> _T:
    try:
        return decoder.decode(raw)
    except msgspec.DecodeError as exc:  # ValidationError is one too
        raise BadEvent(f"{topic}: {exc}") from None


def parse_shop_event(topic: str | None, webhook: str | None, raw: bytes) -> ShopEvent:
    """The meaning of one shop webhook: ``topic`` and ``webhook`` are its
    ``X-Shopify-Topic`` and ``X-Shopify-Webhook-Id`` headers, ``raw`` its body."""
    if not webhook or len(webhook) > 255 or "\x00" in webhook:
        raise BadEvent("X-Shopify-Webhook-Id: missing or malformed")
    if not topic or len(topic) > 255:
        raise BadEvent("X-Shopify-Topic: missing or malformed")
    if topic not in SHOP_TOPICS:
        return ShopEvent(webhook, topic, order=None, shop_order=None, kind="ignored")
    if topic.startswith("fulfillments/"):
        fulfillment = _decode(_fulfillment_decoder, raw, topic)
        if fulfillment.order_id is None:
            raise BadEvent(f"{topic}: Object missing required field `order_id`")
        shipped = fulfillment.status == _SHIPPED
        return ShopEvent(
            webhook,
            topic,
            order=None,
            shop_order=str(fulfillment.order_id),
            kind="shipped" if shipped else "ignored",
            tracking=_tracking(fulfillment) if shipped else None,
        )
    order = _decode(_order_decoder, raw, topic)
    if topic == "orders/cancelled":
        return ShopEvent(webhook, topic, _our_order(order), str(order.id), kind="cancelled")
    # The topic itself says the order shipped; its last shipment has the tracking.
    shipments = [f for f in order.fulfillments or () if f.status == _SHIPPED]
    tracking = _tracking(shipments[-1]) if shipments else None
    return ShopEvent(webhook, topic, _our_order(order), str(order.id), "shipped", tracking)


def parse_payment(raw: bytes) -> Payment:
    """The payment provider's event in ``raw`` (its signature already checked)."""
    return _decode(_payment_decoder, raw, "payment")
