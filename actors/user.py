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
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from actors import money, orders
from actors.catalog import Catalog
from actors.events import (
    AnyEvent,
    Bought,
    Change,
    ContactSet,
    Credited,
    Expired,
    Line,
    OrderMoved,
    OrderOpened,
    PaidIn,
    ProfileAdded,
    PromoRedeemed,
    RefundedPurchase,
    Renamed,
    SlotCleared,
    SlotFilled,
    UsedUp,
)
from actors.money import PurchaseFacts, unequip_everywhere
from actors.state import (
    KEYS_IN_MEMORY,
    LEDGER_IN_MEMORY,
    Holding,
    KeyRecord,
    OrderMemo,
    Profile,
    TopUpMemo,
    UserState,
)
from protocol.errors import ErrorCode, RequestError
from protocol.messages import (
    MAX_GEMS,
    BundleEntry,
    Consume,
    Consumed,
    CreateProfile,
    Delivery,
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
    Purchase,
    Purchased,
    Redeem,
    Redeemed,
    RenameProfile,
    Reply,
    ServerMessage,
    ServerReply,
    Unequip,
    Unequipped,
)
from protocol.money import (
    AdvanceOrder,
    CancelOrder,
    Contact,
    FulfillmentPush,
    OrderCancelled,
    OrderStatus,
    OrderUpdated,
    Payment,
    PaymentApplied,
    Refund,
    Refunded,
    RetryOrder,
    SetContact,
    ShipOrder,
)

__all__ = [
    "KEYS_IN_MEMORY",
    "LEDGER_IN_MEMORY",
    "MAX_PROFILES",
    "Holding",
    "KeyRecord",
    "Mutation",
    "OrderMemo",
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
MAIN_PROFILE = "main"

Mutation = (
    Purchase | Consume | CreateProfile | Equip | Unequip | Grant | RenameProfile | Redeem
    | SetContact | CancelOrder | Refund | RetryOrder | ShipOrder | AdvanceOrder | Payment
)  # fmt: skip


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
        case SetContact():
            return ("set_contact", request.key, request.email, request.address)
        case CancelOrder():
            return ("cancel_order", request.key, request.order)
        case Refund():
            return ("refund", request.key, request.user, request.purchase, request.reason)
        case RetryOrder():
            return ("retry_order", request.order)
        case ShipOrder():
            return ("ship_order", request.order, request.carrier, request.number, request.url)
        case AdvanceOrder():
            return ("advance_order", request.key, request.order, request.status,
                    request.voucher, request.tracking, request.shop_order)  # fmt: skip
        case Payment():
            return ("payment", request.key, request.transaction, request.gems, request.refunded)
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
    if isinstance(request, Grant | Refund):
        return "a:" + request.key
    if isinstance(request, AdvanceOrder | Payment):
        return "i:" + request.key  # the server's own: apart from players' and operators'
    key = getattr(request, "key", None)
    return None if key is None else "p:" + key


def handle(
    state: UserState,
    request: Mutation,
    catalog: Catalog,
    now: int,
    allowance: bool | None = None,
    facts: PurchaseFacts | None = None,
) -> Outcome:
    """Decide and apply one mutation.  Raises ``RequestError`` having changed nothing.

    The caller must have loaded the request's idempotency record into
    ``state.keys`` if it exists (see ``scoped_key``) before calling.  For a
    limited item or a promo code, ``allowance`` says whether the shared
    allowance was reserved for this request (see ``actors.allowance``).  For
    a ``refund``, ``facts`` is what the refunded purchase did (read back from
    the journal), or None when the user made no such purchase.
    """
    key = scoped_key(request)
    if key is not None:
        seen = state.keys.get(key)
        if seen is not None:
            return Outcome(replay(seen, request))
    events = (
        money.decide_refund(state, request, facts, orders.order_of(request.purchase))
        if isinstance(request, Refund)
        else _decide(state, request, catalog, now, allowance)
    )
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
                *unequip_everywhere(state, request.sku, held.quantity - request.quantity),
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
        case SetContact():
            return orders.decide_set_contact(state, request)
        case CancelOrder():
            return orders.decide_cancel(state, request)
        case AdvanceOrder():
            return orders.decide_advance(state, request)
        case RetryOrder():
            return orders.decide_retry(state, request)
        case ShipOrder():
            return orders.decide_ship(state, request)
        case Payment():
            return money.decide_payment(state, request)
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
    return [*unequip_everywhere(state, card, remaining), UsedUp(card, 1),
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
        events += unequip_everywhere(state, sku, 0)
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
    ordered = item.bundle is None and item.delivery in (Delivery.EMAIL, Delivery.PHYSICAL)
    pack = item.pack_gems
    if ordered or pack:
        lines = []  # delivered outside, or a gem pack: nothing is held
        cap = item.hold_cap
        if ordered and cap is not None and request.quantity > cap:
            raise RequestError(ErrorCode.LIMIT_EXCEEDED, f"at most {cap} of {item.sku!r} at once")
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
    if state.debt:
        raise RequestError(
            ErrorCode.INSUFFICIENT_FUNDS, f"a debt of {state.debt} gems must be repaid first"
        )
    if total > state.balance:
        raise RequestError(
            ErrorCode.INSUFFICIENT_FUNDS, f"{total} gems needed, {state.balance} held"
        )
    gems = (item.bundle_gems + pack) * request.quantity
    if state.balance - total + gems > MAX_GEMS:
        raise RequestError(ErrorCode.LIMIT_EXCEEDED, "the balance would exceed its cap")
    purchase = purchase_id(state.user_id, state.version + 1)
    events: list[AnyEvent] = []
    if ordered:
        events.append(
            orders.order_to_open(state, item.sku, item.delivery, request.quantity, total, purchase)
        )
    if item.stock is not None and not allowance:  # checked last: the saga reserved a unit
        if allowance is None:  # the state changed since the shard decided to reserve
            raise RequestError(ErrorCode.UNAVAILABLE, "please retry with the same key")
        raise RequestError(ErrorCode.SOLD_OUT, f"{request.sku!r} is sold out")
    track = limit.count if limit is not None else 0
    return [Bought(purchase, item.sku, request.quantity, total, None, grants, gems, track), *events]


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

    def entry(kind: str, amount: int, sku: str | None = None, quantity: int | None = None) -> None:
        nonlocal ledger
        ledger = LedgerEntry(
            seq=change.version, at=change.at, kind=kind, amount=amount,
            balance=state.balance, sku=sku, quantity=quantity, key=client_key,
        )  # fmt: skip

    for event in change.events:
        match event:
            case Credited(amount=amount, kind=kind):
                entry(kind, money.credit(state, amount))
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
                entry("purchase", event.gems - total, sku, quantity)
            case PromoRedeemed(code=code, gems=gems, grants=grants):
                _grant(state, grants)
                state.redeemed.add(code)
                entry("promo", money.credit(state, gems))
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
            case _:
                _evolve_money(state, event, change.at, entry)
    state.version = change.version
    change.ledger = ledger
    if ledger is not None:
        state.ledger.append(ledger)
        if len(state.ledger) > LEDGER_IN_MEMORY:
            del state.ledger[0]
            state.ledger_complete = False  # the oldest entry leaves memory


def _evolve_money(state: UserState, event: AnyEvent, at: int, entry: Callable[..., None]) -> None:
    """The events of PROTOCOL.md §12 (orders, contacts, refunds, payments)."""
    match event:
        case ContactSet(email=email, address=address):
            state.email, state.address = email, address
        case OrderOpened():
            orders.open_order(state, event, at)
        case OrderMoved(refund=refund, charge=charge):
            orders.move_order(state, event)
            sku = state.orders[event.order].sku
            if refund:
                entry("refund", money.credit(state, refund), sku)
            if charge:
                state.balance -= charge
                entry("purchase", -charge, sku)
        case RefundedPurchase(purchase=purchase, amount=amount, gems=gems):
            state.refunded = state.refunded | {purchase}
            state.balance -= gems
            entry("refund", money.credit(state, amount) - gems)
        case PaidIn(transaction=transaction, gems=gems, refunded=False):
            state.own_topups()[transaction] = TopUpMemo(gems)
            entry("topup", money.credit(state, gems))
        case PaidIn(transaction=transaction, gems=gems, refunded=True):
            seen = state.own_topups().setdefault(transaction, TopUpMemo(0))
            seen.refunded = True
            entry("chargeback", money.charge_back(state, gems))
        case _:  # pragma: no cover
            raise AssertionError(f"unknown event {event!r}")


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
        case _:
            return _reply_money(state, request, change)
    raise AssertionError(f"not a mutation: {request!r}")  # pragma: no cover


def _reply_money(state: UserState, request: Mutation, change: Change | None) -> ServerReply:
    version = state.version
    match request:
        case SetContact():
            return Contact(email=state.email, address=state.address, version=version)
        case CancelOrder():
            memo = state.orders[request.order]
            return OrderCancelled(
                order=request.order, refunded=memo.total, balance=state.balance, version=version
            )
        case Refund():
            moved = change.events[-1] if change else None
            assert isinstance(moved, RefundedPurchase)
            return Refunded(
                user=state.user_id, purchase=moved.purchase, amount=moved.amount,
                balance=state.balance, version=version,
            )  # fmt: skip
        case RetryOrder() | ShipOrder() | AdvanceOrder():
            status = state.orders[request.order].status
            return OrderUpdated(order=request.order, status=status, version=version)
        case Payment():
            return PaymentApplied(
                transaction=request.transaction, balance=state.balance, debt=state.debt,
                version=version,
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
            case Credited() | RefundedPurchase() | PaidIn():
                money = True
            case OrderOpened(order=order, sku=sku):
                out.append(
                    FulfillmentPush(order=order, sku=sku, status=OrderStatus.PENDING,
                                    voucher=None, tracking=None, version=state.version)
                )  # fmt: skip
            case OrderMoved(order=order, refund=refund, charge=charge):
                memo = state.orders[order]
                out.append(
                    FulfillmentPush(order=order, sku=memo.sku, status=event.status,
                                    voucher=event.voucher, tracking=event.tracking,
                                    version=state.version)
                )  # fmt: skip
                money = money or bool(refund or charge)
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
