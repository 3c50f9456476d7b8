"""Messages of fulfillment and money (PROTOCOL.md §12): contacts, orders,
refunds, and the requests the server makes of a user's shard on behalf of
its fulfillment worker and its webhooks.

The player and admin requests here are part of ``ClientMessage``
(``protocol.messages``); ``AdvanceOrder`` and ``Payment`` are *internal*:
no client frame decodes to them, only the server's own worker and webhook
handlers build them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from msgspec import Meta, Struct

from protocol.base import (
    Delivery,
    Key,
    PageLimit,
    PositiveGems,
    Reason,
    Reply,
    Request,
    ServerMessage,
    UserId,
)
from protocol.countries import COUNTRIES

__all__ = [
    "FINAL",
    "Address",
    "AdvanceOrder",
    "CancelOrder",
    "Contact",
    "ContactView",
    "FulfillmentPush",
    "OrderCancelled",
    "OrderEntry",
    "OrderId",
    "OrderStatus",
    "OrderUpdated",
    "Orders",
    "OrdersReply",
    "Payment",
    "PaymentApplied",
    "PurchaseId",
    "Refund",
    "Refunded",
    "RetryOrder",
    "SetContact",
    "ShipOrder",
    "Tracking",
]

#: Ids are looked up in PostgreSQL ``text``, which cannot hold NUL.
OrderId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[^\x00]*\Z")]
PurchaseId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[^\x00]*\Z")]
Email = Annotated[
    str, Meta(min_length=3, max_length=254, pattern=r"^[^@\s\x00]+@[^@\s\x00]+\.[^@\s\x00]+\Z")
]
_Line = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[^\x00]*\Z")]
_Short = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[^\x00]*\Z")]


class OrderStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    SHIPPED = "shipped"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: Statuses an order does not leave (``failed`` only by an operator's retry).
FINAL = frozenset({OrderStatus.COMPLETED, OrderStatus.SHIPPED, OrderStatus.CANCELLED})


class Address(Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A shipping address; ``country`` is ISO 3166-1 alpha-2."""

    name: _Line
    line1: _Line
    city: _Short
    postal_code: Annotated[str, Meta(min_length=1, max_length=16, pattern=r"^[^\x00]*\Z")]
    country: Annotated[str, Meta(min_length=2, max_length=2)]
    line2: _Line | None = None
    region: _Short | None = None

    def __post_init__(self) -> None:
        if self.country not in COUNTRIES:
            raise ValueError(
                f"country: {self.country!r} is not an ISO 3166-1 alpha-2 code (such as GB, US)"
            )


class Tracking(Struct, frozen=True):
    carrier: str
    number: str
    url: str | None = None


class ContactView(Struct, frozen=True):
    email: str | None = None
    address: Address | None = None


# ------------------------------------------------------------- player requests


class SetContact(Request, tag="set_contact"):
    key: Key
    email: Email | None = None
    address: Address | None = None


class Orders(Request, tag="orders"):
    before: OrderId | None = None
    limit: PageLimit = 50


class CancelOrder(Request, tag="cancel_order"):
    key: Key
    order: OrderId


# -------------------------------------------------------------- admin requests


class Refund(Request, tag="refund"):
    user: UserId
    purchase: PurchaseId
    key: Key
    reason: Reason = ""


class RetryOrder(Request, tag="retry_order"):
    order: OrderId


class ShipOrder(Request, tag="ship_order"):
    order: OrderId
    carrier: _Short
    number: Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[^\x00]*\Z")]
    url: Annotated[str, Meta(max_length=512, pattern=r"^https?://[^\s\x00]+\Z")] | None = None


# ----------------------------------------------------------- internal requests


class AdvanceOrder(Request, tag="advance_order"):
    """The worker, a webhook or an operator moves an order on (never a client).
    ``key`` makes it idempotent; ``charge`` re-debits a retried order."""

    key: Key
    order: OrderId
    status: OrderStatus
    voucher: str | None = None
    tracking: Tracking | None = None
    shop_order: str | None = None


class Payment(Request, tag="payment"):
    """A payment provider's top-up (``refunded`` False) or its refund."""

    key: Key
    transaction: Annotated[str, Meta(min_length=1, max_length=128)]
    gems: PositiveGems
    refunded: bool = False


# ---------------------------------------------------------------------- replies


class Contact(Reply, tag="contact"):
    email: str | None
    address: Address | None
    version: int


class OrderEntry(Struct):
    order: str
    purchase: str
    sku: str
    delivery: Delivery
    status: OrderStatus
    attempts: int
    voucher: str | None
    tracking: Tracking | None
    created_at: int
    updated_at: int


class OrdersReply(Reply, tag="orders"):
    entries: list[OrderEntry]
    next: str | None


class OrderCancelled(Reply, tag="order_cancelled"):
    order: str
    refunded: int
    balance: int
    version: int


class Refunded(Reply, tag="refunded"):
    user: str
    purchase: str
    amount: int
    balance: int
    version: int


class OrderUpdated(Reply, tag="order_updated"):
    """The reply to ``retry_order``, ``ship_order`` and the internal
    ``advance_order``: the order's status after the request."""

    order: str
    status: OrderStatus
    version: int


class PaymentApplied(Reply, tag="payment_applied"):
    transaction: str
    balance: int
    debt: int
    version: int


class FulfillmentPush(ServerMessage, tag="fulfillment"):
    order: str
    sku: str
    status: OrderStatus
    voucher: str | None
    tracking: Tracking | None
    version: int
