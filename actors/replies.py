"""What a user's change answers and announces: the reply to the request
that made it, and the pushes to every connection of the user (PROTOCOL.md
§4, §12).  Pure, like ``actors.user``, which calls these after ``evolve``:
they read the state *after* the change.
"""

from __future__ import annotations

from actors.events import (
    Bought,
    Change,
    Credited,
    Expired,
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
from actors.state import Mutation, UserState
from protocol.messages import (
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
    LoadoutPush,
    ProfileCreated,
    ProfileRenamed,
    Purchase,
    Purchased,
    Redeem,
    Redeemed,
    RenameProfile,
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

__all__ = ["pushes", "reply_to"]


def reply_to(state: UserState, request: Mutation, change: Change | None) -> ServerReply:
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
