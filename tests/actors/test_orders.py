"""Order rules (actors/orders.py) that a random walk reaches too rarely."""

from __future__ import annotations

import pytest

from actors import orders
from actors.catalog import Catalog, demo_catalog_text, parse_catalog
from actors.events import Change
from actors.money import purchase_facts
from actors.user import UserState, handle, new_user
from protocol.errors import ErrorCode, RequestError
from protocol.messages import Grant, Purchase
from protocol.money import (
    Address,
    AdvanceOrder,
    CancelOrder,
    OrderStatus,
    Refund,
    SetContact,
)

CATALOG = Catalog.from_document(1, parse_catalog(demo_catalog_text()))
SHIRT = "merch.tshirt.logo"
ADDRESS = Address(name="A", line1="1 Road", city="Town", postal_code="1", country="FR")


def _do(state: UserState, request: object, facts: object = None) -> Change | None:
    outcome = handle(state, request, CATALOG, 1_000, None, facts)  # type: ignore[arg-type]
    return outcome.change


def _buyer() -> UserState:
    state, _ = new_user("buyer", 0, 0)
    _do(state, Grant(user="buyer", amount=100_000, key="g"))
    _do(state, SetContact(key="c", address=ADDRESS, email="a@b.cd"))
    return state


def test_a_forgotten_cancelled_order_is_not_refunded_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(orders, "MAX_ORDERS_IN_MEMORY", 2)
    state = _buyer()
    first = _do(state, Purchase(key="p1", sku=SHIRT, price=3000))
    assert first is not None
    facts = purchase_facts(first)
    assert facts is not None
    order = orders.order_of(facts.purchase)
    _do(state, CancelOrder(key="x", order=order))  # its gems come back
    balance = state.balance
    _do(state, Purchase(key="p2", sku=SHIRT, price=3000))
    _do(state, Purchase(key="p3", sku=SHIRT, price=3000))
    assert order not in state.orders  # forgotten: past the cap, and ended
    with pytest.raises(RequestError) as refused:
        _do(state, Refund(user="buyer", purchase=facts.purchase, key="r"), facts)
    assert refused.value.code is ErrorCode.NOT_REFUNDABLE
    assert state.balance == balance - 6000


@pytest.mark.parametrize(
    ("sku", "status"),
    [(SHIRT, OrderStatus.COMPLETED), ("plat.voucher.steam10", OrderStatus.SHIPPED)],
)
def test_an_order_moves_only_as_its_delivery_does(sku: str, status: OrderStatus) -> None:
    state = _buyer()
    item = CATALOG.lookup(sku)
    assert item is not None
    bought = _do(state, Purchase(key="p", sku=sku, price=item.price))
    assert bought is not None
    facts = purchase_facts(bought)
    assert facts is not None
    order = orders.order_of(facts.purchase)
    with pytest.raises(RequestError) as refused:
        _do(state, AdvanceOrder(key="a", order=order, status=status))
    assert refused.value.code is ErrorCode.BAD_REQUEST
    assert state.orders[order].status is OrderStatus.PENDING
