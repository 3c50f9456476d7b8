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

__all__ = [
    "Bought",
    "Change",
    "Credited",
    "Event",
    "Expired",
    "Line",
    "ProfileAdded",
    "PromoRedeemed",
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
