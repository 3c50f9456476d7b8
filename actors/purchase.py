"""What a purchase and a promo code's redemption decide (PROTOCOL.md §3,
§10, §12): the item's price and limits, what the user receives (items, a
bundle's contents, a gem pack's gems, or an order for the outside world).
Pure, like ``actors.user``, which dispatches here.
"""

from __future__ import annotations

import hashlib

from actors import orders
from actors.catalog import Catalog
from actors.events import AnyEvent, Bought, Line, PromoRedeemed
from actors.state import UserState
from protocol.errors import ErrorCode, RequestError
from protocol.messages import MAX_GEMS, Delivery, ItemStatus, Purchase, Redeem

__all__ = ["MAX_HELD", "MAX_INVENTORY_ENTRIES", "decide_purchase", "decide_redeem",
           "purchase_id", "redeem_check"]  # fmt: skip

MAX_INVENTORY_ENTRIES = 10_000
MAX_HELD = 2**31 - 1


def decide_purchase(
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


def decide_redeem(
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


def purchase_id(user_id: str, version: int) -> str:
    """Unique per (user, version); the same on every replay of the journal."""
    digest = hashlib.blake2b(f"{user_id}\0{version}".encode(), digest_size=10).hexdigest()
    return "pur_" + digest
