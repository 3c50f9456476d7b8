"""A user's state in memory, and the form it is kept in between changes.

``UserState`` is what ``actors.user`` decides on and ``evolve`` changes;
``Snapshot`` is the part of it the ``users`` row keeps besides version and
balance.  Pure data, no decisions: the rules live in ``actors.user``,
``actors.orders`` and ``actors.money``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import msgspec
from msgspec import Struct

from protocol.messages import (
    Consume,
    CreateProfile,
    Equip,
    Grant,
    InventoryEntry,
    LedgerEntry,
    ProfileView,
    Purchase,
    Redeem,
    RenameProfile,
    ServerReply,
    StateReply,
    Unequip,
)
from protocol.money import (
    Address,
    AdvanceOrder,
    CancelOrder,
    ContactView,
    OrderStatus,
    Payment,
    Refund,
    RetryOrder,
    SetContact,
    ShipOrder,
)

__all__ = [
    "KEYS_IN_MEMORY",
    "LEDGER_IN_MEMORY",
    "Holding",
    "KeyRecord",
    "Mutation",
    "OrderMemo",
    "Profile",
    "Snapshot",
    "TopUpMemo",
    "UserState",
]

#: Requests that change a user (through ``actors.user.handle``).
Mutation = (
    Purchase | Consume | CreateProfile | Equip | Unequip | Grant | RenameProfile | Redeem
    | SetContact | CancelOrder | Refund | RetryOrder | ShipOrder | AdvanceOrder | Payment
)  # fmt: skip

#: Durable idempotency keys kept in memory per user; older ones are looked up
#: in the journal, which keeps them.  Keys not yet durable are never dropped
#: from memory (DESIGN.md, "Exactly once, whatever the history").
KEYS_IN_MEMORY = 256
#: Ledger entries kept in memory per user (a full ``history`` page).
LEDGER_IN_MEMORY = 200


class OrderMemo(Struct, array_like=True):
    """What a user's shard remembers of an order: enough to decide a cancel,
    a refund or the next step without reading the ``orders`` table."""

    purchase: str
    sku: str
    delivery: str
    quantity: int
    total: int
    status: OrderStatus
    created: int


class TopUpMemo(Struct, array_like=True):
    """A payment provider's transaction: the gems it credited, and whether
    the provider took them back."""

    gems: int
    refunded: bool = False


class Holding(Struct):
    quantity: int
    expires_at: int | None = None


class Profile(Struct):
    game: str | None
    equipped: dict[str, str] = {}


class Snapshot(Struct, array_like=True):
    """What the ``users`` row keeps besides version and balance."""

    inventory: dict[str, Holding]
    profiles: dict[str, Profile]
    recent: dict[str, list[int]] = {}
    redeemed: list[str] = []
    email: str | None = None
    address: Address | None = None
    debt: int = 0
    orders: dict[str, OrderMemo] = {}
    refunded: list[str] = []
    topups: dict[str, TopUpMemo] = {}


class KeyRecord(NamedTuple):
    """What an idempotency key resolves to: the request's fingerprint, the
    original reply (without rid), and the version of the change that used it."""

    fingerprint: bytes
    reply: ServerReply
    version: int


#: What almost every user has of orders and payment transactions: nothing.
#: Users share these two empty dicts (about 130 bytes a user saved) and are
#: given their own on their first order or payment (``own_orders``,
#: ``own_topups``); nothing may ever be put in them.
NO_ORDERS: dict[str, OrderMemo] = {}
NO_TOPUPS: dict[str, TopUpMemo] = {}
NO_REFUNDS: frozenset[str] = frozenset()


@dataclass(eq=False, slots=True)
class UserState:
    """One user in a shard's memory.  A shard holds up to hundreds of
    thousands, so what an idle user costs counts (BENCHMARKS.md, "A million
    users"): slots, no ``__dict__``; a plain dict for the keys (insertion
    order is their age); a list for the ledger tail (a ``deque`` allocates a
    block of 64 slots, about 600 bytes, for a single entry); the purchases
    refunded are a shared empty ``frozenset`` until there is one."""

    user_id: str
    version: int = 0
    balance: int = 0
    inventory: dict[str, Holding] = field(default_factory=dict)
    profiles: dict[str, Profile] = field(default_factory=dict)
    #: Times (ms) of the latest purchases of items with a purchase limit.
    recent: dict[str, list[int]] = field(default_factory=dict)
    #: Promo codes this user has redeemed (each at most once).
    redeemed: set[str] = field(default_factory=set)
    #: Where vouchers and merchandise go (PROTOCOL.md §12).
    email: str | None = None
    address: Address | None = None
    #: Gems a payment provider took back after they were spent: paid before
    #: anything else is credited; no purchase while any remains.
    debt: int = 0
    #: The user's orders (id -> memo), oldest first; see ``actors.orders``.
    orders: dict[str, OrderMemo] = field(default_factory=lambda: NO_ORDERS)
    #: Purchases an operator refunded (each once).
    refunded: frozenset[str] = NO_REFUNDS
    #: Payment providers' transactions seen (id -> memo).
    topups: dict[str, TopUpMemo] = field(default_factory=lambda: NO_TOPUPS)
    #: Idempotency records in memory, oldest first: every key whose change is
    #: not yet durable, and the latest durable ones (see ``trim_keys``).
    keys: dict[str, KeyRecord] = field(default_factory=dict)
    #: True while ``keys`` holds every key this user ever used.
    keys_complete: bool = True
    #: The highest version known to be durable (the shard sets it after a flush).
    durable_version: int = 0
    #: The latest ledger entries, oldest first, at most ``LEDGER_IN_MEMORY``.
    ledger: list[LedgerEntry] = field(default_factory=list)
    #: True while ``ledger`` holds every ledger entry this user has.
    ledger_complete: bool = True

    _snapshot_encoder = msgspec.msgpack.Encoder()
    _snapshot_decoder = msgspec.msgpack.Decoder(Snapshot)

    def snapshot(self) -> bytes:
        return self._snapshot_encoder.encode(
            Snapshot(
                self.inventory,
                self.profiles,
                self.recent,
                sorted(self.redeemed),
                self.email,
                self.address,
                self.debt,
                self.orders,
                sorted(self.refunded),
                self.topups,
            )
        )

    @classmethod
    def restore(cls, user_id: str, version: int, balance: int, snapshot: bytes) -> UserState:
        snap = cls._snapshot_decoder.decode(snapshot)
        return cls(
            user_id,
            version,
            balance,
            snap.inventory,
            snap.profiles,
            snap.recent,
            set(snap.redeemed),
            snap.email,
            snap.address,
            snap.debt,
            snap.orders or NO_ORDERS,
            frozenset(snap.refunded) if snap.refunded else NO_REFUNDS,
            snap.topups or NO_TOPUPS,
            keys_complete=False,
            ledger_complete=False,
            durable_version=version,
        )

    def remember(self, key: str, record: KeyRecord) -> None:
        """Keep a key's record in memory (a new change's, or one read back
        from the journal).  Nothing is dropped here: see ``trim_keys``."""
        self.keys.pop(key, None)  # (re)inserted last: the newest
        self.keys[key] = record

    def own_orders(self) -> dict[str, OrderMemo]:
        """The user's orders, to add one to (not the shared empty dict)."""
        if self.orders is NO_ORDERS:
            self.orders = {}
        return self.orders

    def own_topups(self) -> dict[str, TopUpMemo]:
        if self.topups is NO_TOPUPS:
            self.topups = {}
        return self.topups

    def mark_durable(self, version: int) -> None:
        self.durable_version = max(self.durable_version, version)

    def trim_keys(self, keep: int = KEYS_IN_MEMORY) -> int:
        """Drop the oldest records beyond ``keep``, durable ones only: a key
        must stay reachable from the moment its change is applied, in memory
        until the journal's index has it.  The shard calls this only when no
        batch is between looking keys up and applying (``ShardHost``).
        Returns how many were dropped."""
        dropped = 0
        while len(self.keys) > keep:
            key, record = next(iter(self.keys.items()))
            if record.version > self.durable_version:
                break
            del self.keys[key]
            dropped += 1
        if dropped:
            self.keys_complete = False
        return dropped

    def view(self, rid: str | int | None = None) -> StateReply:
        return StateReply(
            rid=rid,
            user=self.user_id,
            version=self.version,
            balance=self.balance,
            inventory=[
                InventoryEntry(sku, h.quantity, h.expires_at)
                for sku, h in sorted(self.inventory.items())
            ],
            profiles=[
                ProfileView(name, p.game, dict(p.equipped)) for name, p in self.profiles.items()
            ],
            contact=ContactView(self.email, self.address),
            debt=self.debt,
        )
