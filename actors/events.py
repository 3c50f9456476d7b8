"""What happened to a user: the events a change is made of, and the change
record the journal keeps.

A ``Change`` is one mutation of one user: it bumps the version by exactly one
and is the unit the journal writes, the shard acknowledges and a replay
rebuilds from.  Its events say what changed; ``evolve`` in ``actors.user``
applies them.  The change also remembers the idempotency key, a fingerprint
of the request and the reply, so that a retry after a restart still gets the
original reply.
"""

from __future__ import annotations

import msgspec
from msgspec import Struct

from protocol.messages import LedgerEntry, ServerReply
from protocol.money import Address, OrderStatus, Tracking

__all__ = [
    "Bought",
    "Change",
    "ContactSet",
    "Credited",
    "Event",
    "Expired",
    "Line",
    "OrderMoved",
    "OrderOpened",
    "PaidIn",
    "ProfileAdded",
    "PromoRedeemed",
    "RefundedPurchase",
    "Renamed",
    "SlotCleared",
    "SlotFilled",
    "UsedUp",
    "decode_change",
    "encode_change",
]


class Event(Struct, tag_field="e", array_like=True):
    pass


class Credited(Event, tag="credit"):
    """Gems added: an operator grant, or a new user's starting balance."""

    amount: int
    kind: str
    reason: str = ""


class Line(Struct, array_like=True):
    """Items granted by a purchase: quantity added, and the new expiry if the
    item is time-limited (None: it does not expire)."""

    sku: str
    quantity: int
    expires_at: int | None = None


class Bought(Event, tag="buy"):
    """Gems debited and items granted, together (PROTOCOL.md §3 and §10).

    ``grants`` lists what the user receives (the item itself, or a bundle's
    contents: a bundle is never held); ``gems`` are a bundle's gems.
    ``track`` > 0 records the purchase time for a per-user purchase limit,
    keeping that many of the latest times.  Older records with no ``grants``
    granted ``quantity`` of ``sku`` itself.
    """

    purchase: str
    sku: str
    quantity: int
    total: int
    expires_at: int | None = None
    grants: list[Line] | None = None
    gems: int = 0
    track: int = 0


class PromoRedeemed(Event, tag="promo"):
    """A promo code's gems and items granted, once per user (PROTOCOL.md §10)."""

    code: str
    gems: int
    grants: list[Line]


class Expired(Event, tag="expire"):
    """A time-limited item reached its expiry and left the inventory."""

    sku: str


class Renamed(Event, tag="rename"):
    profile: str
    name: str


class UsedUp(Event, tag="use"):
    sku: str
    quantity: int


class ProfileAdded(Event, tag="profile"):
    profile: str
    game: str | None


class SlotFilled(Event, tag="equip"):
    profile: str
    slot: str
    sku: str


class SlotCleared(Event, tag="unequip"):
    profile: str
    slot: str


class ContactSet(Event, tag="contact"):
    """Where the user's vouchers and merchandise go (PROTOCOL.md §12)."""

    email: str | None
    address: Address | None


class OrderOpened(Event, tag="order"):
    """A purchase that needs the outside world (an email, a shop order):
    written in the purchase's own change, so the outbox and the debit are
    one durable fact.  Carries the contact the order goes to."""

    order: str
    purchase: str
    sku: str
    delivery: str
    quantity: int
    total: int
    email: str | None = None
    address: Address | None = None


class OrderMoved(Event, tag="order_moved"):
    """An order's new status; ``refund`` gems come back with it (a failed or
    cancelled order), ``charge`` gems are debited (an operator's retry)."""

    order: str
    status: OrderStatus
    voucher: str | None = None
    tracking: Tracking | None = None
    shop_order: str | None = None
    refund: int = 0
    charge: int = 0


class RefundedPurchase(Event, tag="refund"):
    """An operator's refund: ``amount`` gems back, the ``gems`` the purchase
    had credited (a bundle's, a gem pack's) taken back.  The items leave
    through ``UsedUp`` events in the same change."""

    purchase: str
    amount: int
    gems: int = 0
    sku: str | None = None


class PaidIn(Event, tag="payment"):
    """A payment provider's transaction: ``gems`` credited (a top-up), or,
    ``refunded``, the transaction's gems taken back (a chargeback): what the
    balance cannot cover becomes debt."""

    transaction: str
    gems: int
    refunded: bool = False


AnyEvent = (
    Credited
    | Bought
    | UsedUp
    | ProfileAdded
    | SlotFilled
    | SlotCleared
    | Expired
    | Renamed
    | PromoRedeemed
    | ContactSet
    | OrderOpened
    | OrderMoved
    | RefundedPurchase
    | PaidIn
)


class Change(Struct, array_like=True):
    version: int
    at: int
    kind: str
    events: list[AnyEvent]
    key: str | None = None
    fingerprint: bytes | None = None
    reply: ServerReply | None = None
    ledger: LedgerEntry | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Change)


def encode_change(change: Change) -> bytes:
    return _encoder.encode(change)


def decode_change(data: bytes) -> Change:
    return _decoder.decode(data)
