"""Money beyond purchases (PROTOCOL.md §12): debt, a payment provider's
top-ups and chargebacks, and an operator's refund of a purchase.

Pure rules, like ``actors.user``: the ``decide_*`` functions only check and
return events (raising ``RequestError`` having changed nothing); the
``credit``/``charge_back`` helpers are what ``evolve`` applies.

Debt: a chargeback takes back gems that were already spent.  The balance
never goes negative; what it cannot cover becomes ``debt``, which every
later credit pays first, and no purchase is made while any remains.
"""

from __future__ import annotations

from typing import NamedTuple

from actors.events import (
    AnyEvent,
    Bought,
    Change,
    Line,
    OrderMoved,
    PaidIn,
    RefundedPurchase,
    SlotCleared,
    UsedUp,
)
from actors.state import UserState
from protocol.errors import ErrorCode, RequestError
from protocol.messages import MAX_GEMS
from protocol.money import FINAL, OrderStatus, Payment, Refund

__all__ = [
    "PurchaseFacts",
    "charge_back",
    "credit",
    "decide_payment",
    "decide_refund",
    "purchase_facts",
    "unequip_everywhere",
]


class PurchaseFacts(NamedTuple):
    """What a purchase did, read back from its journal record (an operator's
    refund names a purchase that is usually long out of memory)."""

    purchase: str
    sku: str
    quantity: int
    total: int
    gems: int
    grants: list[Line]


def purchase_facts(change: Change) -> PurchaseFacts | None:
    for event in change.events:
        if isinstance(event, Bought):
            grants = event.grants
            if grants is None:  # the record format before bundles
                grants = [Line(event.sku, event.quantity, event.expires_at)]
            return PurchaseFacts(
                event.purchase, event.sku, event.quantity, event.total, event.gems, grants
            )
    return None


def credit(state: UserState, amount: int) -> int:
    """Credit gems, paying any debt first; returns what reached the balance."""
    paid = min(state.debt, amount)
    state.debt -= paid
    state.balance += amount - paid
    return amount - paid


def charge_back(state: UserState, gems: int) -> int:
    """Take gems back; what the balance cannot cover becomes debt.  Returns
    the (negative) change of the balance."""
    taken = min(state.balance, gems)
    state.balance -= taken
    state.debt += gems - taken
    return -taken


def unequip_everywhere(state: UserState, sku: str, remaining: int) -> list[AnyEvent]:
    """An item that leaves the inventory is unequipped everywhere (PROTOCOL.md §3)."""
    if remaining > 0:
        return []
    return [
        SlotCleared(name, slot)
        for name, profile in state.profiles.items()
        for slot, equipped in profile.equipped.items()
        if equipped == sku
    ]


def decide_payment(state: UserState, request: Payment) -> list[AnyEvent]:
    """A transaction credits once; its refund takes back once what it credited.
    A refund that arrives first is remembered, so the late credit is ignored."""
    seen = state.topups.get(request.transaction)
    if not request.refunded:
        if seen is not None:
            return []
        if state.balance + request.gems > MAX_GEMS:
            raise RequestError(ErrorCode.LIMIT_EXCEEDED, "the balance would exceed its cap")
        return [PaidIn(request.transaction, request.gems)]
    if seen is not None and seen.refunded:
        return []
    return [PaidIn(request.transaction, seen.gems if seen is not None else 0, refunded=True)]


def decide_refund(
    state: UserState, request: Refund, facts: PurchaseFacts | None, order: str
) -> list[AnyEvent]:
    """Gems back, the purchased items out of the inventory and every loadout,
    an unshipped order cancelled: all or nothing (PROTOCOL.md §12)."""
    if facts is None:
        raise RequestError(
            ErrorCode.NOT_REFUNDABLE, f"{request.user} made no purchase {request.purchase!r}"
        )
    if facts.purchase in state.refunded:
        raise RequestError(ErrorCode.NOT_REFUNDABLE, "this purchase was refunded already")
    memo = state.orders.get(order)
    if memo is not None and memo.status in (OrderStatus.FAILED, OrderStatus.CANCELLED):
        raise RequestError(
            ErrorCode.NOT_REFUNDABLE, f"its order is {memo.status}: its gems came back then"
        )
    events: list[AnyEvent] = []
    taking: dict[str, int] = {}
    for line in facts.grants:
        if line.quantity:
            taking[line.sku] = taking.get(line.sku, 0) + line.quantity
    for sku, quantity in taking.items():
        held = state.inventory.get(sku)
        if held is None or held.quantity < quantity:
            raise RequestError(
                ErrorCode.NOT_REFUNDABLE, f"{sku!r} bought then is no longer all held"
            )
        events += unequip_everywhere(state, sku, held.quantity - quantity)
        events.append(UsedUp(sku, quantity))
    if facts.gems > state.balance:
        raise RequestError(
            ErrorCode.NOT_REFUNDABLE, f"the {facts.gems} gems it credited were spent"
        )
    if state.balance - facts.gems + facts.total > MAX_GEMS:
        raise RequestError(ErrorCode.LIMIT_EXCEEDED, "the balance would exceed its cap")
    if memo is not None and memo.status not in FINAL:
        events.append(OrderMoved(order, OrderStatus.CANCELLED))
    events.append(RefundedPurchase(facts.purchase, facts.total, facts.gems, facts.sku))
    return events
