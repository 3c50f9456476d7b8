"""Property-based tests of PROTOCOL.md §12's rules: random sequences of grants,
purchases (in-game items, a bundle, a gem pack, an email voucher, merchandise),
consumes, contacts, order steps, cancels, retries, operator refunds and
payment top-ups and chargebacks, some with reused idempotency keys.

A model kept beside the user (from the requests and their replies, never from
the ledger) predicts each request's outcome, and after every step the test
checks that gems and items are conserved, that the ledger sums to the
balance, that a refusal changed nothing, and that the journal of changes and
the snapshot both rebuild the same user."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from actors.catalog import Catalog, demo_catalog_text, parse_catalog
from actors.events import Change, OrderOpened, SlotCleared, decode_change, encode_change
from actors.money import PurchaseFacts, purchase_facts
from actors.user import Mutation, UserState, evolve, handle, new_user, purchase_id
from protocol.errors import ErrorCode, RequestError
from protocol.messages import Consume, Equip, Grant, Purchase, Purchased, ServerReply
from protocol.money import (
    Address,
    AdvanceOrder,
    CancelOrder,
    OrderCancelled,
    OrderStatus,
    Payment,
    Refund,
    Refunded,
    RetryOrder,
    SetContact,
    ShipOrder,
    Tracking,
)

USER = "money-user"
NOW = 1_700_000_000_000
CATALOG = Catalog.from_document(1, parse_catalog(demo_catalog_text()))

#: What one unit of each sku puts into the inventory, and the gems it credits.
HELD: dict[str, dict[str, int]] = {
    "plat.life.extra": {"plat.life.extra": 1},
    "br.rifle.tiger": {"br.rifle.tiger": 1},
    "plat.avatar.cyber": {"plat.avatar.cyber": 1},
    "br.bundle.starter": {"br.rifle.tiger": 1, "plat.life.extra": 3},
}
GEMS = {"plat.gems.bonus": 500, "br.bundle.starter": 100}
ORDERED = {"plat.voucher.steam10": "email", "merch.tshirt.logo": "physical"}
SKUS = [*ORDERED, "plat.gems.bonus", *HELD]
IN_GAME = ["plat.life.extra", "br.rifle.tiger", "plat.avatar.cyber"]
PRICES = {sku: CATALOG.items[sku].price for sku in SKUS}
S = OrderStatus
#: Where an order may go by the worker's or the shop's step (PROTOCOL.md §12).
NEXT = {
    S.PENDING: {S.PROCESSING, S.COMPLETED, S.SHIPPED, S.FAILED, S.CANCELLED},
    S.PROCESSING: {S.COMPLETED, S.SHIPPED, S.FAILED, S.CANCELLED},
    S.SHIPPED: {S.SHIPPED},  # new tracking
    S.COMPLETED: set(),
    S.FAILED: set(),
    S.CANCELLED: set(),
}
OPEN = (S.PENDING, S.PROCESSING)
ADDRESS = Address("Ada", "1 Main St", "Springfield", "12345", "US")
KEYS = [f"k{i}" for i in range(12)]
TRANSACTIONS = [f"tx{i}" for i in range(5)]
OK, NO_OP = "ok", "no-op"
Outcome = str | ErrorCode | None  # None: the model does not predict it


@dataclass
class OrderModel:
    sku: str
    total: int
    status: OrderStatus = S.PENDING


@dataclass
class PurchaseModel:
    total: int
    gems: int
    items: Counter[str]
    order: str | None
    refunded: bool = False


def scope(request: Mutation) -> str | None:
    """The key a request is idempotent by, in its scope (PROTOCOL.md §5, §12)."""
    if isinstance(request, Grant | Refund):
        return "a:" + request.key
    if isinstance(request, AdvanceOrder | Payment):
        return "i:" + request.key
    if isinstance(request, Purchase | Consume | SetContact | CancelOrder):
        return "p:" + request.key
    return None


@dataclass
class Run:
    state: UserState
    start: int
    changes: list[Change] = field(default_factory=list)
    ledger_total: int = 0
    net: int = 0  # balance - debt, from the replies and the orders' totals
    purchased: Counter[str] = field(default_factory=Counter)
    consumed: Counter[str] = field(default_factory=Counter)
    taken_back: Counter[str] = field(default_factory=Counter)
    purchases: dict[str, PurchaseModel] = field(default_factory=dict)
    orders: dict[str, OrderModel] = field(default_factory=dict)
    topups: dict[str, tuple[int, bool]] = field(default_factory=dict)  # gems, charged back
    email: str | None = None
    address: Address | None = None
    remembered: dict[str, tuple[Mutation, ServerReply]] = field(default_factory=dict)
    sent: list[Mutation] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    step: int = 0

    @classmethod
    def begin(cls, start: int) -> Run:
        state, change = new_user(USER, start, NOW)
        run = cls(state, start, net=start)
        if change is not None:
            assert change.ledger is not None
            run.ledger_total = change.ledger.amount
        run.check()
        return run

    # ------------------------------------------------------------ the model

    def facts(self, purchase: str) -> PurchaseFacts | None:
        """As the shard finds them: the journal's ``purchase`` change whose
        version makes this purchase id, decoded from its record."""
        for change in self.changes:
            if change.kind == "purchase" and purchase_id(USER, change.version) == purchase:
                return purchase_facts(decode_change(encode_change(change)))
        return None

    def predict(self, request: Mutation) -> Outcome:
        state = self.state
        match request:
            case Grant():
                return OK
            case Purchase() | Equip():
                return None  # but a purchase never succeeds while in debt (see send)
            case Consume(sku=sku, quantity=quantity):
                held = state.inventory.get(sku)
                return OK if held is not None and held.quantity >= quantity else ErrorCode.NOT_OWNED
            case SetContact(email=email, address=address):
                if email is None and address is None:
                    return ErrorCode.BAD_REQUEST
                same = email in (None, self.email) and address in (None, self.address)
                return NO_OP if same else OK
            case Payment(transaction=tx, refunded=refunded):
                seen = self.topups.get(tx)
                if refunded:
                    return NO_OP if seen is not None and seen[1] else OK
                return NO_OP if seen is not None else OK
            case Refund(purchase=purchase):
                return self.predict_refund(purchase)
        order = self.orders.get(getattr(request, "order", ""))
        if order is None:
            return ErrorCode.UNKNOWN_ORDER
        match request:
            case CancelOrder():
                if order.status is S.PROCESSING and ORDERED[order.sku] == "email":
                    return ErrorCode.NOT_CANCELLABLE  # the voucher is on its way
                return OK if order.status in OPEN else ErrorCode.NOT_CANCELLABLE
            case AdvanceOrder(status=status):
                if status == order.status and status is not S.SHIPPED:
                    return NO_OP
                wrong = {S.COMPLETED: "physical", S.SHIPPED: "email"}
                if wrong.get(status) == ORDERED[order.sku]:
                    return ErrorCode.BAD_REQUEST  # a voucher is not shipped, a shirt not emailed
                return OK if status in NEXT[order.status] else ErrorCode.NOT_CANCELLABLE
            case RetryOrder():
                if order.status in OPEN:
                    return NO_OP
                if order.status is not S.FAILED:
                    return ErrorCode.NOT_CANCELLABLE
                if state.debt or state.balance < order.total:
                    return ErrorCode.INSUFFICIENT_FUNDS
                return OK
            case ShipOrder():
                if ORDERED[order.sku] != "physical":
                    return ErrorCode.BAD_REQUEST
                ok = order.status is S.SHIPPED or S.SHIPPED in NEXT[order.status]
                return OK if ok else ErrorCode.NOT_CANCELLABLE
        raise AssertionError(request)

    def predict_refund(self, purchase: str) -> Outcome:
        bought = self.purchases.get(purchase)
        if bought is None or bought.refunded:
            return ErrorCode.NOT_REFUNDABLE
        if bought.order is not None and self.orders[bought.order].status in (S.FAILED, S.CANCELLED):
            return ErrorCode.NOT_REFUNDABLE
        for sku, quantity in bought.items.items():
            held = self.state.inventory.get(sku)
            if held is None or held.quantity < quantity:
                return ErrorCode.NOT_REFUNDABLE
        return ErrorCode.NOT_REFUNDABLE if bought.gems > self.state.balance else OK

    def account(self, request: Mutation, reply: ServerReply, change: Change) -> None:
        """What a change did to the model, from the request and its reply."""
        match request:
            case Grant(amount=amount):
                self.net += amount
            case Purchase(sku=sku, quantity=quantity):
                assert isinstance(reply, Purchased)
                assert reply.total == PRICES[sku] * quantity
                gems = GEMS.get(sku, 0) * quantity
                items = Counter({s: q * quantity for s, q in HELD.get(sku, {}).items()})
                self.net += gems - reply.total
                self.purchased.update(items)
                order = None
                if sku in ORDERED:
                    needed = self.email if ORDERED[sku] == "email" else self.address
                    assert needed is not None
                    (opened,) = [e for e in change.events if isinstance(e, OrderOpened)]
                    order = opened.order
                    self.orders[order] = OrderModel(sku, reply.total)
                self.purchases[reply.purchase] = PurchaseModel(reply.total, gems, items, order)
            case Consume(sku=sku, quantity=quantity):
                self.consumed[sku] += quantity
            case SetContact(email=email, address=address):
                self.email = email if email is not None else self.email
                self.address = address if address is not None else self.address
            case CancelOrder(order=order):
                assert isinstance(reply, OrderCancelled)
                assert reply.refunded == self.orders[order].total
                self.net += reply.refunded
                self.orders[order].status = S.CANCELLED
            case AdvanceOrder(order=order, status=status):
                if status in (S.FAILED, S.CANCELLED):
                    self.net += self.orders[order].total
                self.orders[order].status = status
                self.outcomes[f"advanced to {status}"] += 1
            case RetryOrder(order=order):
                self.net -= self.orders[order].total
                self.orders[order].status = S.PENDING
            case ShipOrder(order=order):
                self.orders[order].status = S.SHIPPED
            case Refund(purchase=purchase):
                assert isinstance(reply, Refunded)
                bought = self.purchases[purchase]
                assert reply.amount == bought.total
                self.net += reply.amount - bought.gems
                self.taken_back.update(bought.items)
                bought.refunded = True
                if bought.order is not None and self.orders[bought.order].status in OPEN:
                    self.orders[bought.order].status = S.CANCELLED
                if any(isinstance(e, SlotCleared) for e in change.events):
                    self.outcomes["refund unequipped"] += 1
            case Payment(transaction=tx, gems=gems, refunded=False):
                self.topups[tx] = (gems, False)
                self.net += gems
            case Payment(transaction=tx, refunded=True):
                credited = self.topups.get(tx, (0, False))[0]
                self.topups[tx] = (credited, True)
                self.net -= credited
                if self.state.debt:
                    self.outcomes["chargeback into debt"] += 1

    # ------------------------------------------------------------- a step

    def send(self, request: Mutation) -> None:
        self.step += 1
        request = msgspec.structs.replace(request, rid=self.step)
        self.sent.append(request)
        key = scope(request)
        seen = self.remembered.get(key) if key is not None else None
        body = msgspec.structs.replace(request, rid=None)
        predicted = self.predict(request)
        debt = self.state.debt
        facts = self.facts(request.purchase) if isinstance(request, Refund) else None
        before = self.fields(self.state)
        try:
            outcome = handle(self.state, request, CATALOG, NOW + self.step, facts=facts)
        except RequestError as exc:
            assert self.fields(self.state) == before, exc.code  # refused: nothing changed
            if seen is not None:
                assert exc.code is ErrorCode.IDEMPOTENCY_CONFLICT and seen[0] != body
            elif predicted is not None:
                assert exc.code == predicted, (request, exc.code, predicted)
            if exc.code is ErrorCode.ADDRESS_REQUIRED:
                assert isinstance(request, Purchase)
                needed = self.email if ORDERED[request.sku] == "email" else self.address
                assert needed is None
            self.outcomes[exc.code.value] += 1
        else:
            reply, change = outcome.reply, outcome.change
            assert reply.rid == request.rid
            if seen is not None:  # a repeated delivery: the first reply, nothing changed
                assert seen[0] == body and change is None
                assert msgspec.structs.replace(reply, rid=None) == seen[1]
                assert self.fields(self.state) == before
                self.outcomes["replayed"] += 1
            elif change is None:
                assert predicted in (NO_OP, None), (request, predicted)
                assert self.fields(self.state) == before
                self.outcomes[f"no-op {type(request).__name__}"] += 1
            else:
                assert predicted in (OK, None), (request, predicted)
                assert not (debt and isinstance(request, Purchase | RetryOrder))
                self.changes.append(change)
                if change.ledger is not None:
                    self.ledger_total += change.ledger.amount
                if key is not None:
                    self.remembered[key] = (body, msgspec.structs.replace(reply, rid=None))
                self.account(request, reply, change)
                self.outcomes[type(request).__name__] += 1
        self.check()

    @staticmethod
    def fields(state: UserState) -> tuple[object, ...]:
        return (state.snapshot(), state.version, state.balance, list(state.keys))

    # --------------------------------------------------------- invariants

    def check(self) -> None:
        state = self.state
        assert self.ledger_total == state.balance
        assert state.balance >= 0 and state.debt >= 0
        assert not (state.debt and state.balance)  # credits pay the debt first
        assert state.balance - state.debt == self.net
        for sku in IN_GAME:
            held = state.inventory[sku].quantity if sku in state.inventory else 0
            assert held + self.taken_back[sku] + self.consumed[sku] == self.purchased[sku], sku
        assert set(state.inventory) <= set(IN_GAME)  # orders and gem packs are not held
        assert {o: m.status for o, m in state.orders.items()} == {
            o: m.status for o, m in self.orders.items()
        }
        assert state.refunded == {p for p, m in self.purchases.items() if m.refunded}
        assert set(state.keys) == set(self.remembered)
        for profile in state.profiles.values():
            assert set(profile.equipped.values()) <= set(state.inventory)
        self.check_rebuild()

    def check_rebuild(self) -> None:
        state = self.state
        rebuilt, _ = new_user(USER, self.start, NOW)
        for change in self.changes:  # as the journal restores a user
            evolve(rebuilt, decode_change(encode_change(change)))
        assert rebuilt.snapshot() == state.snapshot()
        assert (rebuilt.version, rebuilt.balance, rebuilt.debt) == (
            state.version,
            state.balance,
            state.debt,
        )
        restored = UserState.restore(USER, state.version, state.balance, state.snapshot())
        assert restored.snapshot() == state.snapshot()
        assert (restored.version, restored.balance, restored.debt) == (
            state.version,
            state.balance,
            state.debt,
        )
        assert restored.view(1) == state.view(1)


# ----------------------------------------------------------------- the machine

#: A key used before (conflicts and repeats) or, None, a fresh one.
keys = st.one_of(st.none(), st.sampled_from(KEYS))
#: An order or a purchase picked among the user's (an int), or (-1) one never made.
picks = st.one_of(st.integers(0, 100), st.integers(0, 100), st.just(-1))
statuses = st.sampled_from([S.COMPLETED, S.PROCESSING, S.SHIPPED, S.CANCELLED, S.FAILED, S.PENDING])
trackings = st.one_of(st.none(), st.builds(Tracking, st.just("UPS"), st.sampled_from(["1", "2"])))


class MoneyMachine(RuleBasedStateMachine):
    collector: Counter[str] | None = None

    def __init__(self) -> None:
        super().__init__()
        self.run = Run.begin(0)
        self.fresh = 0

    def key(self, key: str | None) -> str:
        self.fresh += 1
        return key if key is not None else f"fresh{self.fresh}"

    def _pick(self, among: list[str], which: int, none: str) -> str:
        return among[which % len(among)] if among and which >= 0 else none

    def order(self, which: int) -> str:
        return self._pick(list(self.run.orders), which, "ord_none")

    @initialize(start=st.sampled_from([0, 500, 6_000, 20_000]), contact=st.booleans())
    def begin(self, start: int, contact: bool) -> None:
        self.run = Run.begin(start)
        if contact:
            self.run.send(SetContact(key="c0", email="ada@example.com", address=ADDRESS))

    @rule(amount=st.integers(1, 8_000), key=keys)
    def grant(self, amount: int, key: str | None) -> None:
        self.run.send(Grant(user=USER, amount=amount, key=self.key(key)))

    @rule(sku=st.sampled_from(SKUS), quantity=st.sampled_from([1, 1, 2, 3]), key=keys)
    def purchase(self, sku: str, quantity: int, key: str | None) -> None:
        self.run.send(Purchase(key=self.key(key), sku=sku, quantity=quantity, price=PRICES[sku]))

    @rule(sku=st.sampled_from(list(ORDERED)), quantity=st.integers(1, 2), contact=st.booleans())
    def order_something(self, sku: str, quantity: int, contact: bool) -> None:
        """An order, made likely: the gems granted and the contact set first."""
        run, total = self.run, PRICES[sku] * quantity
        if contact and (run.email is None or run.address is None):
            run.send(SetContact(key=self.key(None), email="ada@example.com", address=ADDRESS))
        if run.state.balance < total:
            run.send(Grant(user=USER, amount=total - run.state.balance, key=self.key(None)))
        run.send(Purchase(key=self.key(None), sku=sku, quantity=quantity, price=PRICES[sku]))

    @rule(sku=st.sampled_from(list(ORDERED)), back=st.booleans())
    def pay_for_an_order(self, sku: str, back: bool) -> None:
        """Real money pays for an order (with a contact set); the provider
        may take it back at once, after it was spent: debt."""
        run = self.run
        if run.email is None or run.address is None:
            run.send(SetContact(key=self.key(None), email="ada@example.com", address=ADDRESS))
        tx = f"tx-{self.key(None)}"
        gems = max(1, PRICES[sku] - run.state.balance)
        run.send(Payment(key=self.key(None), transaction=tx, gems=gems))
        run.send(Purchase(key=self.key(None), sku=sku, quantity=1, price=PRICES[sku]))
        if back:
            run.send(Payment(key=self.key(None), transaction=tx, gems=gems, refunded=True))

    @rule()
    def buy_and_equip(self) -> None:
        run, sku = self.run, "plat.avatar.cyber"
        if sku not in run.state.inventory:
            if run.state.balance < PRICES[sku]:
                run.send(Grant(user=USER, amount=PRICES[sku], key=self.key(None)))
            run.send(Purchase(key=self.key(None), sku=sku, price=PRICES[sku]))
        run.send(Equip(profile="main", slot="avatar", sku=sku))

    @rule(quantity=st.integers(0, 4), key=keys)
    def consume(self, quantity: int, key: str | None) -> None:
        """0: all the extra lives held (or one if none is)."""
        held = self.run.state.inventory.get("plat.life.extra")
        quantity = quantity or (held.quantity if held else 1)
        self.run.send(Consume(key=self.key(key), sku="plat.life.extra", quantity=quantity))

    @rule(
        email=st.sampled_from([None, "ada@example.com", "bob@example.org"]),
        address=st.sampled_from([None, ADDRESS]),
        key=keys,
    )
    def set_contact(self, email: str | None, address: Address | None, key: str | None) -> None:
        self.run.send(SetContact(key=self.key(key), email=email, address=address))

    @precondition(lambda self: "plat.avatar.cyber" in self.run.state.inventory)
    @rule()
    def equip(self) -> None:
        self.run.send(Equip(profile="main", slot="avatar", sku="plat.avatar.cyber"))

    @precondition(lambda self: self.run.orders)
    @rule(which=picks, key=keys)
    def cancel(self, which: int, key: str | None) -> None:
        self.run.send(CancelOrder(key=self.key(key), order=self.order(which)))

    @precondition(lambda self: self.run.orders)
    @rule(which=picks, status=statuses, tracking=trackings, key=keys)
    def advance(
        self, which: int, status: OrderStatus, tracking: Tracking | None, key: str | None
    ) -> None:
        """A step of the worker or the shop, valid or not; an even ``which``
        prefers the orders still open."""
        open_ = [o for o, m in self.run.orders.items() if m.status in OPEN]
        order = self._pick(open_, which, "") if which % 2 == 0 else ""
        request = AdvanceOrder(
            key=self.key(key), order=order or self.order(which), status=status, tracking=tracking
        )
        self.run.send(request)

    @precondition(lambda self: self.run.orders)
    @rule(which=picks)
    def ship(self, which: int) -> None:
        self.run.send(ShipOrder(order=self.order(which), carrier="UPS", number="1Z"))

    @precondition(lambda self: any(o.status in OPEN for o in self.run.orders.values()))
    @rule(which=picks, key=keys, then=st.sampled_from(["", "retry", "refund"]))
    def fail(self, which: int, key: str | None, then: str) -> None:
        """The worker's last attempt failed: the gems come back; then an
        operator may retry it (the gems are debited again) or try to refund
        its purchase (``not_refundable``: its gems came back already)."""
        open_ = [o for o, m in self.run.orders.items() if m.status in OPEN]
        order = self._pick(open_, which, "ord_none")
        self.run.send(AdvanceOrder(key=self.key(key), order=order, status=S.FAILED))
        if then == "retry":
            self.run.send(RetryOrder(order=order))
        elif then == "refund":
            for purchase in [p for p, m in self.run.purchases.items() if m.order == order]:
                self.run.send(Refund(user=USER, purchase=purchase, key=self.key(None)))

    @precondition(lambda self: any(o.status is S.FAILED for o in self.run.orders.values()))
    @rule(which=picks)
    def retry_failed(self, which: int) -> None:
        failed = [o for o, m in self.run.orders.items() if m.status is S.FAILED]
        self.run.send(RetryOrder(order=self._pick(failed, which, "ord_none")))

    @precondition(lambda self: self.run.orders)
    @rule(which=picks)
    def retry(self, which: int) -> None:
        self.run.send(RetryOrder(order=self.order(which)))

    @precondition(lambda self: self.run.purchases)
    @rule(which=picks, key=keys)
    def refund(self, which: int, key: str | None) -> None:
        bought = list(self.run.purchases)
        purchase = bought[-1] if which == 0 else self._pick(bought, which, "pur_none")
        self.run.send(Refund(user=USER, purchase=purchase, key=self.key(key), reason="support"))

    @rule(
        tx=st.one_of(st.sampled_from(TRANSACTIONS), st.integers(0, 100)),
        gems=st.integers(1, 3_000),
        back=st.booleans(),
        key=keys,
    )
    def payment(self, tx: str | int, gems: int, back: bool, key: str | None) -> None:
        """Top-ups and chargebacks, repeated and in any order; an int picks a
        transaction seen before."""
        if isinstance(tx, int):
            tx = self._pick(list(self.run.topups), tx, "tx0")
        self.run.send(Payment(key=self.key(key), transaction=tx, gems=gems, refunded=back))

    @precondition(lambda self: any(scope(r) for r in self.run.sent))
    @rule(which=st.integers(0, 1_000))
    def redeliver(self, which: int) -> None:
        """A request delivered again (a webhook, a client's retry)."""
        keyed = [r for r in self.run.sent if scope(r)]
        self.run.send(keyed[which % len(keyed)])

    def teardown(self) -> None:
        if self.collector is not None:
            self.collector.update(self.run.outcomes)


RUNS = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_random_money_operations_conserve_gems_and_items() -> None:
    run_state_machine_as_test(MoneyMachine, settings=RUNS)


def test_the_machine_reaches_every_outcome() -> None:
    """Guards against strategies that silently stop exercising a path."""
    seen: Counter[str] = Counter()

    class Collecting(MoneyMachine):
        collector = seen

    run_state_machine_as_test(
        Collecting, settings=settings(RUNS, max_examples=250, derandomize=True)
    )
    expected = {
        "Grant", "Purchase", "Consume", "SetContact", "Equip", "CancelOrder", "AdvanceOrder",
        "RetryOrder", "ShipOrder", "Refund", "Payment", "replayed", "refund unequipped",
        "chargeback into debt", "no-op Payment", "no-op AdvanceOrder", "no-op RetryOrder",
        "advanced to failed", "advanced to cancelled",
        *(
            code.value
            for code in (
                ErrorCode.INSUFFICIENT_FUNDS, ErrorCode.ADDRESS_REQUIRED,
                ErrorCode.NOT_CANCELLABLE, ErrorCode.NOT_REFUNDABLE, ErrorCode.UNKNOWN_ORDER,
                ErrorCode.IDEMPOTENCY_CONFLICT, ErrorCode.NOT_OWNED, ErrorCode.BAD_REQUEST,
            )
        ),
    }  # fmt: skip
    assert expected <= set(seen), expected - set(seen)
    assert len([s for s in seen if s.startswith("advanced to")]) >= 3, seen
