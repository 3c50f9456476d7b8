"""Orders: purchases that need the outside world (PROTOCOL.md §12).

A purchase of an ``email`` or ``physical`` item opens an order in its own
change (``OrderOpened`` beside the ``Bought``), so the journal's flush writes
the outbox row with the debit.  The order then moves on only through its
user's shard: the fulfillment worker, the shop's webhooks and operators send
requests (``AdvanceOrder``, ``RetryOrder``, ``ShipOrder``), and the player may
``cancel_order``.  A ``failed`` or ``cancelled`` order gives its gems back in
the change that ends it.

Pure rules: the ``decide_*`` functions check and return events, raising
``RequestError`` having changed nothing; ``open_order``/``move_order`` are
what ``evolve`` applies.
"""

from __future__ import annotations

from actors.events import AnyEvent, ContactSet, OrderMoved, OrderOpened
from actors.state import OrderMemo, UserState
from protocol.errors import ErrorCode, RequestError
from protocol.messages import Delivery
from protocol.money import (
    FINAL,
    AdvanceOrder,
    CancelOrder,
    OrderStatus,
    RetryOrder,
    SetContact,
    ShipOrder,
    Tracking,
)

__all__ = [
    "MAX_ORDERS_IN_MEMORY",
    "decide_advance",
    "decide_cancel",
    "decide_retry",
    "decide_set_contact",
    "decide_ship",
    "move_order",
    "open_order",
    "order_of",
    "order_to_open",
]

#: Orders a user's state remembers; beyond it the oldest ended ones are
#: forgotten (the ``orders`` table keeps them all).
MAX_ORDERS_IN_MEMORY = 1000

#: Where each status may go next, and who moves it there.
_NEXT: dict[OrderStatus, frozenset[OrderStatus]] = {
    OrderStatus.PENDING: frozenset(
        {
            OrderStatus.PROCESSING,
            OrderStatus.COMPLETED,
            OrderStatus.SHIPPED,
            OrderStatus.FAILED,
            OrderStatus.CANCELLED,
        }
    ),
    OrderStatus.PROCESSING: frozenset(
        {OrderStatus.COMPLETED, OrderStatus.SHIPPED, OrderStatus.FAILED, OrderStatus.CANCELLED}
    ),
    OrderStatus.SHIPPED: frozenset({OrderStatus.SHIPPED}),  # new tracking
    OrderStatus.FAILED: frozenset({OrderStatus.PENDING}),  # an operator's retry
    OrderStatus.COMPLETED: frozenset(),
    OrderStatus.CANCELLED: frozenset(),
}
_REFUNDING = (OrderStatus.FAILED, OrderStatus.CANCELLED)


def order_of(purchase: str) -> str:
    """The order of a purchase (at most one): its id follows from the purchase's."""
    return "ord_" + purchase.removeprefix("pur_")


def order_to_open(
    state: UserState, sku: str, delivery: Delivery, quantity: int, total: int, purchase: str
) -> OrderOpened:
    """The order a purchase of an ``email`` or ``physical`` item opens; the
    contact it needs must be known (``address_required``)."""
    if delivery is Delivery.EMAIL and state.email is None:
        raise RequestError(
            ErrorCode.ADDRESS_REQUIRED, f"{sku!r} is sent by email: set_contact an email first"
        )
    if delivery is Delivery.PHYSICAL and state.address is None:
        raise RequestError(
            ErrorCode.ADDRESS_REQUIRED, f"{sku!r} is shipped: set_contact an address first"
        )
    return OrderOpened(
        order_of(purchase), purchase, sku, delivery.value, quantity, total,
        state.email, state.address if delivery is Delivery.PHYSICAL else None,
    )  # fmt: skip


def decide_set_contact(state: UserState, request: SetContact) -> list[AnyEvent]:
    if request.email is None and request.address is None:
        raise RequestError(ErrorCode.BAD_REQUEST, "give an email, an address, or both")
    email = request.email if request.email is not None else state.email
    address = request.address if request.address is not None else state.address
    if email == state.email and address == state.address:
        return []
    return [ContactSet(email, address)]


def _memo(state: UserState, order: str) -> OrderMemo:
    memo = state.orders.get(order)
    if memo is None:
        raise RequestError(ErrorCode.UNKNOWN_ORDER, f"no order {order!r}")
    return memo


def decide_cancel(state: UserState, request: CancelOrder) -> list[AnyEvent]:
    memo = _memo(state, request.order)
    if memo.status in FINAL or memo.status is OrderStatus.FAILED:
        raise RequestError(ErrorCode.NOT_CANCELLABLE, f"the order is {memo.status}")
    if memo.status is OrderStatus.PROCESSING and memo.delivery == Delivery.EMAIL.value:
        raise RequestError(ErrorCode.NOT_CANCELLABLE, "the voucher is being sent")
    return [OrderMoved(request.order, OrderStatus.CANCELLED, refund=memo.total)]


def decide_advance(state: UserState, request: AdvanceOrder) -> list[AnyEvent]:
    """The worker's and the shop's steps.  A step to where the order is
    already (a repeated delivery) changes nothing; one it cannot take is
    ``not_cancellable`` (the order ended meanwhile, e.g. the player cancelled)."""
    memo = _memo(state, request.order)
    status = request.status
    if status == memo.status and status is not OrderStatus.SHIPPED:
        return []
    wrong = {OrderStatus.COMPLETED: Delivery.PHYSICAL, OrderStatus.SHIPPED: Delivery.EMAIL}
    if memo.delivery == wrong.get(status, None):
        raise RequestError(ErrorCode.BAD_REQUEST, f"a {memo.delivery} order is not {status}")
    if status not in _NEXT[memo.status] or status is OrderStatus.PENDING:
        raise RequestError(
            ErrorCode.NOT_CANCELLABLE, f"the order is {memo.status}; it cannot become {status}"
        )
    return [
        OrderMoved(
            request.order,
            status,
            request.voucher,
            request.tracking,
            request.shop_order,
            refund=memo.total if status in _REFUNDING else 0,
        )
    ]


def decide_retry(state: UserState, request: RetryOrder) -> list[AnyEvent]:
    """A failed order back to ``pending``: its gems were given back when it
    failed, so they are debited again (``insufficient_funds`` otherwise).
    Retrying an order that is pending or processing already changes nothing."""
    memo = _memo(state, request.order)
    if memo.status in (OrderStatus.PENDING, OrderStatus.PROCESSING):
        return []
    if memo.status is not OrderStatus.FAILED:
        raise RequestError(ErrorCode.NOT_CANCELLABLE, f"the order is {memo.status}")
    if state.debt or state.balance < memo.total:
        raise RequestError(
            ErrorCode.INSUFFICIENT_FUNDS, f"{memo.total} gems needed, {state.balance} held"
        )
    return [OrderMoved(request.order, OrderStatus.PENDING, charge=memo.total)]


def decide_ship(state: UserState, request: ShipOrder) -> list[AnyEvent]:
    """An operator ships a physical order by hand (no shop configured)."""
    memo = _memo(state, request.order)
    if memo.delivery != Delivery.PHYSICAL.value:
        raise RequestError(ErrorCode.BAD_REQUEST, f"order {request.order!r} is not shipped")
    tracking = Tracking(request.carrier, request.number, request.url)
    if memo.status is OrderStatus.SHIPPED:
        pass  # new tracking for a shipped order
    elif OrderStatus.SHIPPED not in _NEXT[memo.status]:
        raise RequestError(ErrorCode.NOT_CANCELLABLE, f"the order is {memo.status}")
    return [OrderMoved(request.order, OrderStatus.SHIPPED, tracking=tracking)]


def open_order(state: UserState, event: OrderOpened, at: int) -> None:
    state.own_orders()[event.order] = OrderMemo(
        event.purchase, event.sku, event.delivery, event.quantity, event.total,
        OrderStatus.PENDING, at,
    )  # fmt: skip
    excess = len(state.orders) - MAX_ORDERS_IN_MEMORY
    if excess > 0:
        ended = [o for o, m in state.orders.items() if m.status in FINAL and o != event.order]
        for order in ended[:excess]:
            forgotten = state.orders.pop(order)
            if forgotten.status is OrderStatus.CANCELLED:
                # Its gems came back: remembered as refunded, so that no
                # operator's refund of its purchase pays them out again.
                state.refunded = state.refunded | {forgotten.purchase}


def move_order(state: UserState, event: OrderMoved) -> None:
    state.orders[event.order].status = event.status
