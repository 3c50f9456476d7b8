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
from actors.purchase import decide_purchase, decide_redeem, purchase_id, redeem_check
from actors.replies import pushes, reply_to
from actors.state import (
    KEYS_IN_MEMORY,
    LEDGER_IN_MEMORY,
    Holding,
    KeyRecord,
    Mutation,
    OrderMemo,
    Profile,
    TopUpMemo,
    UserState,
)
from protocol.errors import ErrorCode, RequestError
from protocol.messages import (
    MAX_GEMS,
    Consume,
    CreateProfile,
    Equip,
    Grant,
    ItemKind,
    LedgerEntry,
    Purchase,
    Redeem,
    RenameProfile,
    Reply,
    ServerMessage,
    Unequip,
)
from protocol.money import (
    AdvanceOrder,
    CancelOrder,
    Payment,
    Refund,
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
    "purchase_id",
    "pushes",
    "redeem_check",
    "replay",
    "same_request",
]

MAX_PROFILES = 32
MAIN_PROFILE = "main"


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
        return Outcome(msgspec.structs.replace(reply_to(state, request, None), rid=request.rid))
    change = _change(state, now, request.__struct_config__.tag, events, key)  # type: ignore[arg-type]
    evolve(state, change)
    reply = reply_to(state, request, change)
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
            return decide_purchase(state, request, catalog, now, allowance)
        case Redeem():
            return decide_redeem(state, request, catalog, now, allowance)
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


def evolve(state: UserState, change: Change) -> None:
    """Apply a change's events: the only code that mutates a user."""
    if change.version != state.version + 1:
        raise ValueError(f"change {change.version} does not follow version {state.version}")
    #: The change's movement of gems, if any: (kind, amount, sku, quantity).
    moved: _Moved | None = None
    for event in change.events:
        match event:
            case Credited(amount=amount, kind=kind):
                moved = (kind, money.credit(state, amount), None, None)
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
                moved = ("purchase", event.gems - total, sku, quantity)
            case PromoRedeemed(code=code, gems=gems, grants=grants):
                _grant(state, grants)
                state.redeemed.add(code)
                moved = ("promo", money.credit(state, gems), None, None)
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
                moved = _evolve_money(state, event, change.at) or moved
    state.version = change.version
    if moved is None:
        change.ledger = None
        return
    ledger = change.ledger = LedgerEntry(
        seq=change.version, at=change.at, kind=moved[0], amount=moved[1],
        balance=state.balance, sku=moved[2], quantity=moved[3],
        key=change.key[2:] if change.key else None,
    )  # fmt: skip
    state.ledger.append(ledger)
    if len(state.ledger) > LEDGER_IN_MEMORY:
        del state.ledger[0]
        state.ledger_complete = False  # the oldest entry leaves memory


_Moved = tuple[str, int, str | None, int | None]


def _evolve_money(state: UserState, event: AnyEvent, at: int) -> _Moved | None:
    """The events of PROTOCOL.md §12 (orders, contacts, refunds, payments);
    returns the gems they moved, if any."""
    match event:
        case ContactSet(email=email, address=address):
            state.email, state.address = email, address
        case OrderOpened():
            orders.open_order(state, event, at)
        case OrderMoved(refund=refund, charge=charge):
            orders.move_order(state, event)
            sku = state.orders[event.order].sku
            if refund:
                return ("refund", money.credit(state, refund), sku, None)
            if charge:
                state.balance -= charge
                return ("purchase", -charge, sku, None)
        case RefundedPurchase(purchase=purchase, amount=amount, gems=gems):
            state.refunded = state.refunded | {purchase}
            state.balance -= gems
            return ("refund", money.credit(state, amount) - gems, event.sku, None)
        case PaidIn(transaction=transaction, gems=gems, refunded=False):
            state.own_topups()[transaction] = TopUpMemo(gems)
            return ("topup", money.credit(state, gems), None, None)
        case PaidIn(transaction=transaction, gems=gems, refunded=True):
            seen = state.own_topups().setdefault(transaction, TopUpMemo(0))
            seen.refunded = True
            return ("chargeback", money.charge_back(state, gems), None, None)
        case _:  # pragma: no cover
            raise AssertionError(f"unknown event {event!r}")
    return None


def _grant(state: UserState, grants: list[Line]) -> None:
    for line in grants:
        held = state.inventory.setdefault(line.sku, Holding(0, line.expires_at))
        held.quantity += line.quantity
        held.expires_at = line.expires_at
