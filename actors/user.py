"""The user entity: wallet, inventory, profiles, idempotency keys, ledger tail.

Pure, synchronous domain code (no asyncio, database, redis or ray here).
``handle`` takes a user's state and one request and returns the reply, the
``Change`` to journal (if anything changed) and the pushes to send.  It first
*decides* (validation only; raising ``RequestError`` leaves the state exactly
as it was), then *evolves* the state by the change's events.  ``evolve`` is the
only code that mutates a user, and replaying the journal through it rebuilds
the same state.

The shard calls ``handle`` with no ``await`` between reading and writing a
user, which is what serializes mutations of one user without locks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import NamedTuple

import msgspec
from msgspec import Struct

from actors.catalog import Catalog
from actors.events import (
    AnyEvent,
    Bought,
    Change,
    Credited,
    Expired,
    Line,
    ProfileAdded,
    PromoRedeemed,
    Renamed,
    SlotCleared,
    SlotFilled,
    UsedUp,
)
from protocol.errors import ErrorCode, RequestError
from protocol.messages import (
    MAX_GEMS,
    BundleEntry,
    Consume,
    Consumed,
    CreateProfile,
    Equip,
    Equipped,
    Grant,
    Granted,
    InventoryEntry,
    InventoryPush,
    ItemKind,
    ItemStatus,
    LedgerEntry,
    LoadoutPush,
    ProfileCreated,
    ProfileRenamed,
    ProfileView,
    Purchase,
    Purchased,
    Redeem,
    Redeemed,
    RenameProfile,
    Reply,
    ServerMessage,
    ServerReply,
    StateReply,
    Unequip,
    Unequipped,
)

__all__ = [
    "KEYS_IN_MEMORY",
    "LEDGER_IN_MEMORY",
    "MAX_PROFILES",
    "Holding",
    "KeyRecord",
    "Mutation",
    "Outcome",
    "Profile",
    "UserState",
    "evolve",
    "fingerprint",
    "handle",
    "new_user",
    "replay",
    "same_request",
]

MAX_PROFILES = 32
MAX_INVENTORY_ENTRIES = 10_000
MAX_HELD = 2**31 - 1
#: Durable idempotency keys kept in memory per user; older ones are looked up
#: in the journal, which keeps them.  Keys not yet durable are never dropped
#: from memory (DESIGN.md, "Exactly once, whatever the history").
KEYS_IN_MEMORY = 256
#: Ledger entries kept in memory per user (a full ``history`` page).
LEDGER_IN_MEMORY = 200
MAIN_PROFILE = "main"

Mutation = Purchase | Consume | CreateProfile | Equip | Unequip | Grant | RenameProfile | Redeem


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


class KeyRecord(NamedTuple):
    """What an idempotency key resolves to: the request's fingerprint, the
    original reply (without rid), and the version of the change that used it."""

    fingerprint: bytes
    reply: ServerReply
    version: int


@dataclass(eq=False, slots=True)
class UserState:
    """One user in a shard's memory.  A shard holds up to hundreds of
    thousands, so what an idle user costs counts (BENCHMARKS.md, "A million
    users"): slots, no ``__dict__``; a plain dict for the keys (insertion
    order is their age); a list for the ledger tail (a ``deque`` allocates a
    block of 64 slots, about 600 bytes, for a single entry)."""

    user_id: str
    version: int = 0
    balance: int = 0
    inventory: dict[str, Holding] = field(default_factory=dict)
    profiles: dict[str, Profile] = field(default_factory=dict)
    #: Times (ms) of the latest purchases of items with a purchase limit.
    recent: dict[str, list[int]] = field(default_factory=dict)
    #: Promo codes this user has redeemed (each at most once).
    redeemed: set[str] = field(default_factory=set)
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
            Snapshot(self.inventory, self.profiles, self.recent, sorted(self.redeemed))
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
            keys_complete=False,
            ledger_complete=False,
            durable_version=version,
        )

    def remember(self, key: str, record: KeyRecord) -> None:
        """Keep a key's record in memory (a new change's, or one read back
        from the journal).  Nothing is dropped here: see ``trim_keys``."""
        self.keys.pop(key, None)  # (re)inserted last: the newest
        self.keys[key] = record

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
        )


@dataclass
class Outcome:
    reply: Reply
    change: Change | None = None
    pushes: list[ServerMessage] = field(default_factory=list)


def new_user(user_id: str, starting_balance: int, now: int) -> tuple[UserState, Change | None]:
    """A user seen for the first time: profile ``main``, and the starting
    balance as a ledgered credit so that the ledger always sums to the balance."""
    state = UserState(user_id, profiles={MAIN_PROFILE: Profile(None)})
    if starting_balance <= 0:
        return state, None
    change = _change(state, now, "starting", [Credited(starting_balance, "starting")], None)
    evolve(state, change)
    return state, change


_fingerprint_encoder = msgspec.msgpack.Encoder()
#: The first byte of a fingerprint says how it was made.  Version 1 (16 bytes,
#: no prefix) hashed the whole request struct, so a field added to a request
#: type changed it: it is still understood for records written before.
_FINGERPRINT_V2 = b"\x02"


def _canonical(request: Mutation) -> tuple[object, ...]:
    """The fields that make two requests "the same" for idempotency, by name
    and in a fixed order: a field added later (with its default) leaves the
    fingerprints of every request made before unchanged."""
    match request:
        case Purchase():
            return ("purchase", request.key, request.sku, request.quantity, request.price)
        case Consume():
            return ("consume", request.key, request.sku, request.quantity)
        case Grant():
            return ("grant", request.key, request.user, request.amount, request.reason)
        case Redeem():
            return ("redeem", request.key, request.code)
        case RenameProfile():
            return ("rename_profile", request.key, request.profile, request.name)
        case CreateProfile():
            return ("create_profile", request.profile, request.game)
        case Equip():
            return ("equip", request.profile, request.slot, request.sku)
        case Unequip():
            return ("unequip", request.profile, request.slot)
    raise AssertionError(f"not a mutation: {request!r}")  # pragma: no cover


def fingerprint(request: Mutation) -> bytes:
    """What makes two requests "the same" for idempotency: a versioned hash
    of the request's canonical fields (everything but the rid)."""
    body = _fingerprint_encoder.encode(_canonical(request))
    return _FINGERPRINT_V2 + hashlib.blake2b(body, digest_size=16).digest()


def _fingerprint_v1(request: Mutation) -> bytes:
    body = _fingerprint_encoder.encode(msgspec.structs.replace(request, rid=None))
    return hashlib.blake2b(body, digest_size=16).digest()


def same_request(stored: bytes, request: Mutation) -> bool:
    """Is ``request`` the one whose fingerprint was stored (any version)?"""
    if len(stored) == 16:  # version 1, before fingerprints had a version byte
        return stored == _fingerprint_v1(request)
    return stored == fingerprint(request)


def scoped_key(request: Mutation) -> str | None:
    """Player keys and operator grant keys live apart: a player cannot
    collide with (or replay) an operator's grant."""
    if isinstance(request, Grant):
        return "a:" + request.key
    key = getattr(request, "key", None)
    return None if key is None else "p:" + key


def handle(
    state: UserState,
    request: Mutation,
    catalog: Catalog,
    now: int,
    allowance: bool | None = None,
) -> Outcome:
    """Decide and apply one mutation.  Raises ``RequestError`` having changed nothing.

    The caller must have loaded the request's idempotency record into
    ``state.keys`` if it exists (see ``scoped_key``) before calling.  For a
    limited item or a promo code, ``allowance`` says whether the shared
    allowance was reserved for this request (see ``actors.allowance``).
    """
    key = scoped_key(request)
    if key is not None:
        seen = state.keys.get(key)
        if seen is not None:
            return Outcome(replay(seen, request))
    events = _decide(state, request, catalog, now, allowance)
    if not events:  # nothing to change (e.g. equipping what is already equipped)
        return Outcome(msgspec.structs.replace(_reply(state, request, None), rid=request.rid))
    change = _change(state, now, request.__struct_config__.tag, events, key)  # type: ignore[arg-type]
    evolve(state, change)
    reply = _reply(state, request, change)
    if key is not None:
        change.fingerprint = fingerprint(request)
        change.reply = reply
        state.remember(key, KeyRecord(change.fingerprint, reply, change.version))
    return Outcome(msgspec.structs.replace(reply, rid=request.rid), change, pushes(state, change))


def replay(seen: KeyRecord, request: Mutation) -> Reply:
    """The answer to a key used before: its original reply (with this rid),
    or ``idempotency_conflict`` when the key was used for another request."""
    if not same_request(seen.fingerprint, request):
        raise RequestError(
            ErrorCode.IDEMPOTENCY_CONFLICT, "this key was used for a different request"
        )
    return msgspec.structs.replace(seen.reply, rid=request.rid)


def _change(
    state: UserState, now: int, kind: str, events: list[AnyEvent], key: str | None
) -> Change:
    return Change(version=state.version + 1, at=now, kind=kind, events=events, key=key)


def _decide(
    state: UserState, request: Mutation, catalog: Catalog, now: int, allowance: bool | None
) -> list[AnyEvent]:
    match request:
        case Purchase():
            return _decide_purchase(state, request, catalog, now, allowance)
        case Redeem():
            return _decide_redeem(state, request, catalog, now, allowance)
        case Consume():
            item = catalog.lookup(request.sku)
            held = state.inventory.get(request.sku)
            if item is None and held is None:
                raise RequestError(ErrorCode.UNKNOWN_ITEM, f"no item {request.sku!r}")
            if item is not None and item.kind is not ItemKind.CONSUMABLE:
                raise RequestError(ErrorCode.INCOMPATIBLE, f"{request.sku!r} is not a consumable")
            if held is None or held.quantity < request.quantity:
                raise RequestError(
                    ErrorCode.NOT_OWNED,
                    f"you hold {held.quantity if held else 0} of {request.sku!r}",
                )
            return [
                *_unequip_everywhere(state, request.sku, held.quantity - request.quantity),
                UsedUp(request.sku, request.quantity),
            ]
        case CreateProfile():
            if request.profile in state.profiles:
                raise RequestError(ErrorCode.PROFILE_EXISTS, f"profile {request.profile!r} exists")
            if request.game is not None and request.game not in catalog.games:
                raise RequestError(ErrorCode.BAD_REQUEST, f"no game {request.game!r}")
            if len(state.profiles) >= MAX_PROFILES:
                raise RequestError(
                    ErrorCode.LIMIT_EXCEEDED, f"at most {MAX_PROFILES} profiles per user"
                )
            return [ProfileAdded(request.profile, request.game)]
        case Equip():
            return _decide_equip(state, request, catalog)
        case Unequip():
            profile = _profile(state, request.profile)
            if request.slot not in profile.equipped:
                return []
            return [SlotCleared(request.profile, request.slot)]
        case Grant():
            if state.balance + request.amount > MAX_GEMS:
                raise RequestError(ErrorCode.LIMIT_EXCEEDED, "the balance would exceed its cap")
            return [Credited(request.amount, "grant", request.reason)]
        case RenameProfile():
            return _decide_rename(state, request, catalog)
    raise AssertionError(f"not a mutation: {request!r}")  # pragma: no cover


def _decide_rename(state: UserState, request: RenameProfile, catalog: Catalog) -> list[AnyEvent]:
    """PROTOCOL.md §10: renaming uses up one consumable whose
    ``metadata.effect`` is ``"rename"``, in the same change."""
    _profile(state, request.profile)
    if request.name in state.profiles:
        raise RequestError(ErrorCode.PROFILE_EXISTS, f"profile {request.name!r} exists")
    cards = [
        sku
        for sku in sorted(state.inventory)
        if (item := catalog.lookup(sku)) is not None
        and item.kind is ItemKind.CONSUMABLE
        and item.metadata.get("effect") == "rename"
    ]
    if not cards:
        raise RequestError(ErrorCode.NOT_OWNED, "renaming a profile takes a name-change card")
    card = cards[0]
    remaining = state.inventory[card].quantity - 1
    return [*_unequip_everywhere(state, card, remaining), UsedUp(card, 1),
            Renamed(request.profile, request.name)]  # fmt: skip


def expire_due(state: UserState, now: int) -> Change | None:
    """The change that removes every item whose expiry has come (PROTOCOL.md
    §10: expired items leave the inventory and every loadout), or None."""
    due = sorted(
        sku
        for sku, h in state.inventory.items()
        if h.expires_at is not None and h.expires_at <= now
    )
    if not due:
        return None
    events: list[AnyEvent] = []
    for sku in due:
        events += _unequip_everywhere(state, sku, 0)
        events.append(Expired(sku))
    change = _change(state, now, "expire", events, None)
    evolve(state, change)
    return change


def next_expiry(state: UserState) -> int | None:
    """When the user's next time-limited item expires (ms), if any."""
    times = [h.expires_at for h in state.inventory.values() if h.expires_at is not None]
    return min(times) if times else None


def _decide_purchase(
    state: UserState, request: Purchase, catalog: Catalog, now: int, allowance: bool | None = None
) -> list[AnyEvent]:
    # PROTOCOL.md §3 "Purchase" and §10, checked in this order.
    item = catalog.items.get(request.sku)
    if item is None or item.status is not ItemStatus.ACTIVE:
        raise RequestError(ErrorCode.UNKNOWN_ITEM, f"{request.sku!r} is not for sale")
    price, _ = catalog.price_at(item, now)
    if request.price != price:
        raise RequestError(ErrorCode.PRICE_CHANGED, f"the price of {request.sku!r} is now {price}")
    if item.bundle is None and not item.stackable and request.quantity != 1:
        raise RequestError(
            ErrorCode.LIMIT_EXCEEDED, f"{request.sku!r} is held once and bought one at a time"
        )
    lines = (
        [(line.sku, line.quantity * request.quantity) for line in item.bundle]
        if item.bundle is not None
        else [(item.sku, request.quantity)]
    )
    # A bundle's own duration, if it has one, applies to everything it grants.
    duration = item.duration_ms if item.bundle is not None else None
    grants = [_grant_line(state, catalog, sku, quantity, now, duration) for sku, quantity in lines]
    limit = catalog.limit_for(item)
    if limit is not None:
        times = [t for t in state.recent.get(item.sku, ()) if t > now - limit.per_ms]
        if len(times) >= limit.count:
            wait = times[-limit.count] + limit.per_ms - now
            raise RequestError(
                ErrorCode.LIMIT_EXCEEDED,
                f"at most {limit.count} of {request.sku!r} per {limit.per}",
                retry_after_ms=max(1, wait),
            )
    total = price * request.quantity
    if total > state.balance:
        raise RequestError(
            ErrorCode.INSUFFICIENT_FUNDS, f"{total} gems needed, {state.balance} held"
        )
    gems = item.bundle_gems * request.quantity
    if state.balance - total + gems > MAX_GEMS:
        raise RequestError(ErrorCode.LIMIT_EXCEEDED, "the balance would exceed its cap")
    if item.stock is not None and not allowance:  # checked last: the saga reserved a unit
        if allowance is None:  # the state changed since the shard decided to reserve
            raise RequestError(ErrorCode.UNAVAILABLE, "please retry with the same key")
        raise RequestError(ErrorCode.SOLD_OUT, f"{request.sku!r} is sold out")
    purchase = purchase_id(state.user_id, state.version + 1)
    track = limit.count if limit is not None else 0
    return [Bought(purchase, item.sku, request.quantity, total, None, grants, gems, track)]


def redeem_check(state: UserState, request: Redeem, catalog: Catalog, now: int) -> None:
    """The user's side of a redemption, before any use of the code is reserved."""
    promo = catalog.promos.get(request.code)
    if promo is None:
        raise RequestError(ErrorCode.UNKNOWN_CODE, "no such promo code")
    expires = promo.expires_ms
    if expires is not None and now >= expires:
        raise RequestError(ErrorCode.CODE_EXPIRED, "this promo code has expired")
    if request.code in state.redeemed:
        raise RequestError(ErrorCode.LIMIT_EXCEEDED, "you have redeemed this code already")


def _decide_redeem(
    state: UserState, request: Redeem, catalog: Catalog, now: int, allowance: bool | None
) -> list[AnyEvent]:
    # PROTOCOL.md §10: once per user (here), at most max_uses in all (the allowance).
    redeem_check(state, request, catalog, now)
    promo = catalog.promos[request.code]
    grants = [_grant_line(state, catalog, line.sku, line.quantity, now) for line in promo.items]
    if state.balance + promo.gems > MAX_GEMS:
        raise RequestError(ErrorCode.LIMIT_EXCEEDED, "the balance would exceed its cap")
    if allowance is None:  # the state changed since the shard decided to reserve
        raise RequestError(ErrorCode.UNAVAILABLE, "please retry with the same key")
    if not allowance:
        raise RequestError(ErrorCode.LIMIT_EXCEEDED, "this promo code has been used up")
    return [PromoRedeemed(request.code, promo.gems, grants)]


def _grant_line(
    state: UserState,
    catalog: Catalog,
    sku: str,
    quantity: int,
    now: int,
    duration: int | None = None,
) -> Line:
    """What granting ``quantity`` of ``sku`` adds, after the holding limits;
    ``duration`` (ms) overrides the item's own (a bundle's applies to all)."""
    item = catalog.lookup(sku)
    assert item is not None, sku  # bundles are checked against their catalog
    held = state.inventory.get(sku)
    held_quantity = held.quantity if held else 0
    duration = duration if duration is not None else item.duration_ms
    if held is not None and (held.expires_at is None) != (duration is None):
        # One holding has one expiry: timed and permanent units do not mix.
        kind = "a time-limited" if duration is not None else "a permanent"
        raise RequestError(ErrorCode.LIMIT_EXCEEDED, f"{sku!r} is held; this would add {kind} one")
    if not item.stackable and held_quantity:
        if duration is None or held is None or held.expires_at is None:
            raise RequestError(ErrorCode.LIMIT_EXCEEDED, f"you already hold {sku!r}")
        quantity = 0  # held once: buying again only extends the expiry
    cap = item.hold_cap if item.hold_cap is not None else MAX_HELD
    if held_quantity + quantity > cap:
        raise RequestError(ErrorCode.LIMIT_EXCEEDED, f"you may hold at most {cap} of {sku!r}")
    if held is None and len(state.inventory) >= MAX_INVENTORY_ENTRIES:
        raise RequestError(ErrorCode.LIMIT_EXCEEDED, "the inventory is full")
    expires_at = None
    if duration is not None:  # buying again extends the expiry (PROTOCOL.md §10)
        current = held.expires_at if held is not None and held.expires_at else now
        expires_at = max(current, now) + duration
    return Line(sku, quantity, expires_at)


def _decide_equip(state: UserState, request: Equip, catalog: Catalog) -> list[AnyEvent]:
    # PROTOCOL.md §3, "Equip".
    profile = _profile(state, request.profile)
    if request.sku not in state.inventory:
        raise RequestError(ErrorCode.NOT_OWNED, f"you do not hold {request.sku!r}")
    item = catalog.lookup(request.sku)
    if item is None:
        raise RequestError(ErrorCode.UNKNOWN_ITEM, f"no item {request.sku!r}")
    if item.kind is ItemKind.CONSUMABLE:
        raise RequestError(ErrorCode.INCOMPATIBLE, "consumables cannot be equipped")
    if item.slot != request.slot:
        where = f"slot {item.slot!r}" if item.slot else "no slot"
        raise RequestError(ErrorCode.INCOMPATIBLE, f"{request.sku!r} goes in {where}")
    if item.game is not None and item.game != profile.game:
        raise RequestError(
            ErrorCode.INCOMPATIBLE, f"{request.sku!r} is for game {item.game!r} only"
        )
    if profile.equipped.get(request.slot) == request.sku:
        return []
    return [SlotFilled(request.profile, request.slot, request.sku)]


def _unequip_everywhere(state: UserState, sku: str, remaining: int) -> list[AnyEvent]:
    """An item that leaves the inventory is unequipped everywhere (PROTOCOL.md §3)."""
    if remaining > 0:
        return []
    return [
        SlotCleared(name, slot)
        for name, profile in state.profiles.items()
        for slot, equipped in profile.equipped.items()
        if equipped == sku
    ]


def _profile(state: UserState, name: str) -> Profile:
    profile = state.profiles.get(name)
    if profile is None:
        raise RequestError(ErrorCode.UNKNOWN_PROFILE, f"no profile {name!r}")
    return profile


def purchase_id(user_id: str, version: int) -> str:
    """Unique per (user, version); the same on every replay of the journal."""
    digest = hashlib.blake2b(f"{user_id}\0{version}".encode(), digest_size=10).hexdigest()
    return "pur_" + digest


def evolve(state: UserState, change: Change) -> None:
    """Apply a change's events: the only code that mutates a user."""
    if change.version != state.version + 1:
        raise ValueError(f"change {change.version} does not follow version {state.version}")
    ledger: LedgerEntry | None = None
    client_key = change.key[2:] if change.key else None
    for event in change.events:
        match event:
            case Credited(amount=amount, kind=kind):
                state.balance += amount
                ledger = LedgerEntry(
                    seq=change.version, at=change.at, kind=kind, amount=amount,
                    balance=state.balance, key=client_key,
                )  # fmt: skip
            case Bought(sku=sku, quantity=quantity, total=total):
                grants = event.grants
                if grants is None:  # the record format before bundles
                    grants = [Line(sku, quantity, event.expires_at)]
                state.balance += event.gems - total
                _grant(state, grants)
                if event.track:
                    times = state.recent.setdefault(sku, [])
                    times.append(change.at)
                    del times[: -event.track]
                ledger = LedgerEntry(
                    seq=change.version, at=change.at, kind="purchase", amount=event.gems - total,
                    balance=state.balance, sku=sku, quantity=quantity, key=client_key,
                )  # fmt: skip
            case PromoRedeemed(code=code, gems=gems, grants=grants):
                state.balance += gems
                _grant(state, grants)
                state.redeemed.add(code)
                ledger = LedgerEntry(
                    seq=change.version, at=change.at, kind="promo", amount=gems,
                    balance=state.balance, key=client_key,
                )  # fmt: skip
            case Expired(sku=sku):
                del state.inventory[sku]
            case Renamed(profile=old, name=new):
                state.profiles = {
                    (new if name == old else name): p for name, p in state.profiles.items()
                }
            case UsedUp(sku=sku, quantity=quantity):
                held = state.inventory[sku]
                held.quantity -= quantity
                if held.quantity == 0:
                    del state.inventory[sku]
            case ProfileAdded(profile=name, game=game):
                state.profiles[name] = Profile(game, {})
            case SlotFilled(profile=name, slot=slot, sku=sku):
                state.profiles[name].equipped[slot] = sku
            case SlotCleared(profile=name, slot=slot):
                del state.profiles[name].equipped[slot]
    state.version = change.version
    change.ledger = ledger
    if ledger is not None:
        state.ledger.append(ledger)
        if len(state.ledger) > LEDGER_IN_MEMORY:
            del state.ledger[0]
            state.ledger_complete = False  # the oldest entry leaves memory


def _grant(state: UserState, grants: list[Line]) -> None:
    for line in grants:
        held = state.inventory.setdefault(line.sku, Holding(0, line.expires_at))
        held.quantity += line.quantity
        held.expires_at = line.expires_at


def _reply(state: UserState, request: Mutation, change: Change | None) -> ServerReply:
    version = state.version
    match request:
        case Purchase():
            bought = change.events[0] if change else None
            assert isinstance(bought, Bought)
            return Purchased(
                purchase=bought.purchase, sku=bought.sku, quantity=bought.quantity,
                total=bought.total, balance=state.balance, version=version,
            )  # fmt: skip
        case Consume():
            held = state.inventory.get(request.sku)
            return Consumed(sku=request.sku, quantity=held.quantity if held else 0, version=version)
        case CreateProfile():
            return ProfileCreated(profile=request.profile, game=request.game, version=version)
        case Equip():
            return Equipped(
                profile=request.profile, slot=request.slot, sku=request.sku, version=version
            )
        case Unequip():
            return Unequipped(profile=request.profile, slot=request.slot, version=version)
        case Grant():
            return Granted(user=state.user_id, balance=state.balance, version=version)
        case RenameProfile():
            return ProfileRenamed(profile=request.name, version=version)
        case Redeem():
            redeemed = change.events[0] if change else None
            assert isinstance(redeemed, PromoRedeemed)
            return Redeemed(
                code=redeemed.code, gems=redeemed.gems,
                items=[BundleEntry(g.sku, g.quantity) for g in redeemed.grants],
                balance=state.balance, version=version,
            )  # fmt: skip
    raise AssertionError(f"not a mutation: {request!r}")  # pragma: no cover


def pushes(state: UserState, change: Change) -> list[ServerMessage]:
    """The pushes a change causes (PROTOCOL.md §4), from the state after it."""
    out: list[ServerMessage] = []
    items: dict[str, InventoryEntry] = {}
    money = False
    profiles: set[str] = set()
    renamed: dict[str, str] = {}
    skus: list[str] = []
    for event in change.events:
        match event:
            case Credited():
                money = True
            case Bought(sku=sku, grants=grants):
                money = True
                skus += [line.sku for line in grants] if grants is not None else [sku]
            case PromoRedeemed(grants=grants):
                money = True
                skus += [line.sku for line in grants]
            case UsedUp(sku=sku) | Expired(sku=sku):
                skus.append(sku)
            case ProfileAdded(profile=name) | SlotFilled(profile=name) | SlotCleared(profile=name):
                profiles.add(name)
            case Renamed(profile=old, name=new):
                renamed[old] = new
                profiles.add(old)
    for sku in skus:
        held = state.inventory.get(sku)
        items[sku] = InventoryEntry(
            sku, held.quantity if held else 0, held.expires_at if held else None
        )
    if money or items:
        out.append(InventoryPush(state.version, state.balance, list(items.values())))
    for name in sorted({renamed.get(n, n) for n in profiles}):
        profile = state.profiles[name]
        out.append(LoadoutPush(state.version, name, profile.game, dict(profile.equipped)))
    return out
