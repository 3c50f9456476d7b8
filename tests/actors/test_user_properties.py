"""Property-based tests of the user entity: random sequences of mutations
through ``handle`` keep the wallet, inventory, loadouts, versions and ledger
consistent, and the journal of changes rebuilds the same user."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
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

from actors.catalog import Catalog, ItemSpec, parse_catalog
from actors.catalog import demo_catalog_text as _demo_text
from actors.events import (
    Bought,
    Change,
    Credited,
    ProfileAdded,
    SlotCleared,
    SlotFilled,
    UsedUp,
    decode_change,
    encode_change,
)
from actors.user import (
    KEYS_IN_MEMORY,
    Mutation,
    Profile,
    UserState,
    evolve,
    handle,
    new_user,
)
from protocol.errors import ErrorCode, RequestError
from protocol.messages import (
    MAX_GEMS,
    MAX_QUANTITY,
    Consume,
    CreateProfile,
    Equip,
    Grant,
    InventoryPush,
    ItemKind,
    LedgerEntry,
    LoadoutPush,
    Purchase,
    ServerMessage,
    ServerReply,
    Unequip,
)

USER = "prop-user"
NOW = 1_700_000_000_000

# Two catalog versions over the demo catalog.  Between them one item turns
# from an equippable stackable item into a consumable (so that consuming can
# unequip), and its price changes.  Limits (stackable, max_quantity) are the
# same in both, so that "held quantities respect max_quantity" is well defined.
_EXTRA = """
[[items]]
sku = "plat.charm.morph"
name = "Morphing Charm"
kind = "{kind}"
price = {price}
{slot}
stackable = true
max_quantity = 3

[[items]]
sku = "plat.vault.key"
name = "Vault Key"
kind = "non_consumable"
price = 2251799813685248
stackable = true

[[items]]
sku = "plat.free.badge"
name = "Free Badge"
kind = "non_consumable"
price = 0
slot = "badge"
stackable = true
max_quantity = 2
"""
CATALOGS = [
    Catalog.from_document(
        1,
        parse_catalog(
            _demo_text() + _EXTRA.format(kind="non_consumable", price=30, slot='slot = "charm"')
        ),
    ),
    Catalog.from_document(
        2, parse_catalog(_demo_text() + _EXTRA.format(kind="consumable", price=35, slot=""))
    ),
]
#: Every sku, plus one no catalog has; consumables and equippable items first,
#: as Hypothesis favours the first.
SKUS = [
    "plat.charm.morph",
    "plat.life.extra",
    "plat.avatar.cyber",
    "br.rifle.tiger",
    "plat.booster.xp",
    "plat.frame.gold",
    "br.hat.crown",
    "kart.body.flame",
    "br.rifle.dragon",
    "plat.free.badge",
    "plat.card.rename",
    "plat.voucher.steam10",
    "merch.tshirt.logo",
    "plat.gems.bonus",
    "plat.vault.key",
    "br.glider.phoenix",
    "br.rifle.legacy",
    "br.bundle.starter",
    "br.emote.dance",
    "br.skin.ghost.trial",
    "plat.chest.daily",
    "br.rifle.founders",
    "no.such.sku",
]
assert sorted(SKUS) == sorted([*CATALOGS[0].items, "no.such.sku"])
SLOTS = [*sorted({i.slot for i in CATALOGS[0].items.values() if i.slot}), "utility", "nope"]
PROFILES = ["main", "br", "kart", "plain"]
GAMES = [None, "br", "kart", "chess"]
KEYS = [f"k{i}" for i in range(30)]


def limit_of(sku: str) -> int | None:
    item = CATALOGS[0].lookup(sku)
    assert item is not None
    return item.hold_cap


# --------------------------------------------------------------------------- operations


@dataclass(frozen=True)
class GrantOp:
    amount: int
    key: str


@dataclass(frozen=True)
class GrantToCapOp:
    """A grant of exactly what is left to the cap, plus ``delta``."""

    delta: int
    key: str


@dataclass(frozen=True)
class PurchaseOp:
    sku: str
    quantity: int
    price_offset: int  # 0: the current price
    key: str


@dataclass(frozen=True)
class ConsumeOp:
    sku: str | int  # an int picks one of the skus held
    quantity: int | None  # None: all that is held
    key: str


@dataclass(frozen=True)
class CreateProfileOp:
    profile: str
    game: str | None


@dataclass(frozen=True)
class EquipOp:
    profile: str | int  # an int picks one of the user's profiles
    slot: str | None  # None: the item's own slot
    sku: str | int  # an int picks one of the skus held


@dataclass(frozen=True)
class UnequipOp:
    profile: str | int  # an int picks one of the user's profiles
    slot: str | None  # None: a slot the profile has filled


@dataclass(frozen=True)
class ReplayOp:
    """Send an earlier keyed request again, as it was or with another body."""

    index: int
    same: bool


@dataclass(frozen=True)
class SwitchCatalogOp:
    index: int


Op = (
    GrantOp
    | GrantToCapOp
    | PurchaseOp
    | ConsumeOp
    | CreateProfileOp
    | EquipOp
    | UnequipOp
    | ReplayOp
    | SwitchCatalogOp
)

keys = st.sampled_from(KEYS)
skus = st.sampled_from(SKUS)
#: A sku named outright, or (an int) one of those held when the step runs.
held_skus = st.one_of(st.integers(0, 20), skus)
quantities = st.one_of(st.just(1), st.integers(1, 4), st.sampled_from([MAX_QUANTITY, 99, 100, 3]))
grants = st.builds(
    GrantOp,
    st.one_of(st.integers(1, 2_000), st.integers(MAX_GEMS - 3_000, MAX_GEMS)),
    keys,
)
purchases = st.builds(PurchaseOp, skus, quantities, st.one_of(st.just(0), st.integers(-5, 5)), keys)
consumes = st.builds(ConsumeOp, held_skus, quantities, keys)
#: A profile named outright, or (an int) one of the user's profiles when the step runs.
any_profiles = st.one_of(st.integers(0, 8), st.sampled_from(PROFILES))
equips = st.builds(
    EquipOp,
    any_profiles,
    st.one_of(st.none(), st.sampled_from(SLOTS)),
    held_skus,
)
unequips = st.builds(UnequipOp, any_profiles, st.one_of(st.none(), st.sampled_from(SLOTS)))
starting_balances = st.one_of(
    st.integers(1, 5_000),
    st.just(0),
    st.integers(1_000_000, 10_000_000),
    st.integers(MAX_GEMS - 5_000, MAX_GEMS),
)


def _other_body(request: Mutation) -> Mutation:
    """The same key with a different request."""
    match request:
        case Purchase():
            return msgspec.structs.replace(request, quantity=request.quantity % 7 + 1)
        case Consume():
            return msgspec.structs.replace(request, quantity=request.quantity % 7 + 1)
        case Grant():
            amount = request.amount - 1 if request.amount > 1 else 2
            return msgspec.structs.replace(request, amount=amount)
    raise AssertionError(request)


# --------------------------------------------------------------------------- the run


@dataclass
class Before:
    snapshot: bytes
    version: int
    balance: int
    keys: list[tuple[str, tuple[bytes, ServerReply]]]
    ledger: tuple[int, LedgerEntry | None]

    @classmethod
    def of(cls, state: UserState) -> Before:
        return cls(
            state.snapshot(),
            state.version,
            state.balance,
            list(state.keys.items()),
            (len(state.ledger), state.ledger[-1] if state.ledger else None),
        )


@dataclass
class Run:
    """One user driven through a sequence of operations, with a model of its keys."""

    state: UserState
    starting_balance: int
    changes: list[Change] = field(default_factory=list)
    ledger_total: int = 0
    catalog: Catalog = field(default_factory=lambda: CATALOGS[0])
    sent: list[Mutation] = field(default_factory=list)
    #: (scope, key) -> (request without rid, reply) for every key that succeeded.
    remembered: dict[tuple[str, str], tuple[Mutation, ServerReply]] = field(default_factory=dict)
    outcomes: Counter[str] = field(default_factory=Counter)
    check_no_op_rid: bool = False
    step: int = 0

    @classmethod
    def start(cls, starting_balance: int) -> Run:
        state, change = new_user(USER, starting_balance, NOW)
        run = cls(state, starting_balance)
        if change is not None:
            assert change.ledger is not None
            run.ledger_total += change.ledger.amount
        run.check_invariants()
        return run

    def pick(self, sku: str | int, fits: Callable[[ItemSpec], bool]) -> str:
        """``sku`` itself, or (an int) one of the skus held, preferring those that fit."""
        if isinstance(sku, str):
            return sku
        held = sorted(self.state.inventory)
        fitting = [s for s in held if (item := self.catalog.lookup(s)) and fits(item)]
        pool = fitting or held or SKUS
        return pool[sku % len(pool)]

    def profile(self, name: str | int, fits: Callable[[Profile], bool]) -> str:
        """``name`` itself, or (an int) one of the user's profiles, preferring those that fit."""
        if isinstance(name, str):
            return name
        names = sorted(self.state.profiles)
        pool = [n for n in names if fits(self.state.profiles[n])] or names
        return pool[name % len(pool)]

    def request_for(self, op: Op) -> Mutation | None:
        rid: str | int = self.step if self.step % 2 else f"r{self.step}"
        match op:
            case GrantOp(amount=amount, key=key):
                return Grant(rid=rid, user=USER, amount=amount, key=key)
            case GrantToCapOp(delta=delta, key=key):
                amount = max(1, MAX_GEMS - self.state.balance + delta)
                return Grant(rid=rid, user=USER, amount=amount, key=key)
            case PurchaseOp(sku=sku, quantity=quantity, price_offset=offset, key=key):
                item = self.catalog.items.get(sku)
                price = max(0, (item.price if item else 10) + offset)
                return Purchase(rid=rid, key=key, sku=sku, quantity=quantity, price=price)
            case ConsumeOp(sku=sku, quantity=quantity, key=key):
                sku = self.pick(sku, lambda item: item.kind is ItemKind.CONSUMABLE)
                if quantity is None:
                    held = self.state.inventory.get(sku)
                    quantity = held.quantity if held else 1
                return Consume(rid=rid, key=key, sku=sku, quantity=quantity)
            case CreateProfileOp(profile=profile, game=game):
                return CreateProfile(rid=rid, profile=profile, game=game)
            case EquipOp(profile=which, slot=slot, sku=pick):
                sku = self.pick(pick, lambda item: item.slot is not None)
                item = self.catalog.lookup(sku)
                game = item.game if item else None
                profile = self.profile(which, lambda p: game is None or p.game == game)
                if slot is None:
                    slot = item.slot if item and item.slot else "utility"
                return Equip(rid=rid, profile=profile, slot=slot, sku=sku)
            case UnequipOp(profile=which, slot=slot):
                profile = self.profile(which, lambda p: bool(p.equipped))
                if slot is None:
                    filled = self.state.profiles.get(profile)
                    slot = min(filled.equipped) if filled and filled.equipped else "frame"
                return Unequip(rid=rid, profile=profile, slot=slot)
            case ReplayOp(index=index, same=same):
                keyed = [r for r in self.sent if isinstance(r, Purchase | Consume | Grant)]
                if not keyed:
                    return None
                earlier = keyed[index % len(keyed)]
                body = earlier if same else _other_body(earlier)
                return msgspec.structs.replace(body, rid=rid)
            case SwitchCatalogOp(index=index):
                self.catalog = CATALOGS[index]
                return None
        raise AssertionError(op)

    def apply(self, op: Op) -> None:
        self.step += 1
        request = self.request_for(op)
        if request is None:
            return
        self.sent.append(request)
        scope_key = _scope_key(request)
        seen = self.remembered.get(scope_key) if scope_key else None
        body = msgspec.structs.replace(request, rid=None)
        before = Before.of(self.state)
        try:
            outcome = handle(self.state, request, self.catalog, NOW + self.step)
        except RequestError as exc:
            # Refused: nothing changed at all.
            assert Before.of(self.state) == before, exc.code
            if seen is not None:
                assert exc.code is ErrorCode.IDEMPOTENCY_CONFLICT
                assert seen[0] != body
            self.outcomes[exc.code.value] += 1
        else:
            change = outcome.change
            if seen is not None:
                # Idempotent replay: the original reply, this rid, nothing changed.
                assert seen[0] == body
                assert change is None and outcome.pushes == []
                assert outcome.reply == msgspec.structs.replace(seen[1], rid=request.rid)
                assert Before.of(self.state) == before
                self.outcomes["replayed"] += 1
            elif change is None:
                # A no-op (equip what is equipped, unequip an empty slot).
                assert scope_key is None
                assert outcome.pushes == []
                assert Before.of(self.state) == before
                if self.check_no_op_rid:
                    assert outcome.reply.rid == request.rid
                self.outcomes["no-op"] += 1
            else:
                assert change.version == before.version + 1 == self.state.version
                assert outcome.reply.rid == request.rid
                assert getattr(outcome.reply, "version", None) == self.state.version
                check_pushes(self.state, change, outcome.pushes)
                self.changes.append(change)
                if change.ledger is not None:
                    self.ledger_total += change.ledger.amount
                    assert self.state.ledger[-1] == change.ledger
                    assert change.ledger.balance == self.state.balance
                else:
                    assert self.state.balance == before.balance
                if scope_key is not None:
                    assert change.key == scope_key[0] + ":" + scope_key[1]
                    stored = msgspec.structs.replace(outcome.reply, rid=None)
                    self.remembered[scope_key] = (body, stored)
                self.outcomes[type(request).__name__] += 1
                kinds = {type(e) for e in change.events}
                if {UsedUp, SlotCleared} <= kinds:
                    self.outcomes["used up while equipped"] += 1
                if isinstance(request, Grant) and self.state.balance == MAX_GEMS:
                    self.outcomes["granted to the cap"] += 1
        self.check_invariants()

    def check_invariants(self) -> None:
        state = self.state
        assert 0 <= state.balance <= MAX_GEMS
        assert self.ledger_total == state.balance
        assert state.version == len(self.changes) + (1 if self.starting_balance > 0 else 0)
        for sku, held in state.inventory.items():
            assert held.quantity > 0, sku
            limit = limit_of(sku)
            assert limit is None or held.quantity <= limit, (sku, held.quantity)
        for name, profile in state.profiles.items():
            for slot, sku in profile.equipped.items():
                assert sku in state.inventory, (name, slot, sku)
        assert "main" in state.profiles
        assert len(state.keys) <= KEYS_IN_MEMORY
        # Every key that succeeded is remembered, under its scope, and no other.
        assert set(state.keys) == {f"{scope}:{key}" for scope, key in self.remembered}

    def check_rebuild(self) -> None:
        for decode in (False, True):
            rebuilt, first = new_user(USER, self.starting_balance, NOW)
            assert (first is None) == (self.starting_balance <= 0)
            for change in self.changes:
                evolve(rebuilt, decode_change(encode_change(change)) if decode else change)
            assert rebuilt.snapshot() == self.state.snapshot()
            assert (rebuilt.version, rebuilt.balance) == (self.state.version, self.state.balance)
            assert list(rebuilt.ledger) == list(self.state.ledger)
            assert rebuilt.view() == self.state.view()


def check_pushes(state: UserState, change: Change, pushes: list[ServerMessage]) -> None:
    """PROTOCOL.md §4: ``inventory`` with the changed entries only (0 for gone) when
    items or gems moved; one ``loadout`` per profile the change touched."""
    skus: set[str] = set()
    profiles: set[str] = set()
    money = False
    for event in change.events:
        match event:
            case Credited():
                money = True
            case Bought(sku=sku, grants=lines):
                money = True
                # A bundle is never held: its contents are what changed.
                skus.update([line.sku for line in lines] if lines is not None else [sku])
            case UsedUp(sku=sku):
                skus.add(sku)
            case ProfileAdded(profile=name) | SlotFilled(profile=name) | SlotCleared(profile=name):
                profiles.add(name)
    assert pushes, "every change is pushed"
    inventory = [p for p in pushes if isinstance(p, InventoryPush)]
    loadouts = [p for p in pushes if isinstance(p, LoadoutPush)]
    assert len(inventory) + len(loadouts) == len(pushes)
    if money or skus:
        (push,) = inventory
        assert (push.version, push.balance) == (state.version, state.balance)
        assert {e.sku for e in push.items} == skus and len(push.items) == len(skus)
        for entry in push.items:
            held = state.inventory.get(entry.sku)
            assert entry.quantity == (held.quantity if held else 0)
    else:
        assert inventory == []
    assert {p.profile for p in loadouts} == profiles and len(loadouts) == len(profiles)
    for push in loadouts:
        profile = state.profiles[push.profile]
        assert push.version == state.version
        assert (push.game, push.equipped) == (profile.game, profile.equipped)


def _scope_key(request: Mutation) -> tuple[str, str] | None:
    if isinstance(request, Grant):
        return ("a", request.key)
    if isinstance(request, Purchase | Consume):
        return ("p", request.key)
    return None


#: A user's first steps: some shopping, profiles and equipping, so that the
#: rules below have something to work with however few of them a run enables.
openings = st.lists(
    st.one_of(
        purchases,
        st.builds(PurchaseOp, st.just(SKUS[0]), st.just(1), st.just(0), keys),
        st.builds(CreateProfileOp, st.sampled_from(PROFILES), st.sampled_from(GAMES)),
        st.builds(EquipOp, st.integers(0, 8), st.none(), st.integers(0, 20)),
    ),
    max_size=12,
)


class UserMachine(RuleBasedStateMachine):
    """Drives one user through random operations; ``Run.apply`` checks every step."""

    check_no_op_rid = False
    #: When set, every run's outcomes are added to it (see the coverage test).
    collector: Counter[str] | None = None

    def __init__(self) -> None:
        super().__init__()
        self.run = Run.start(0)

    @initialize(starting_balance=starting_balances, opening=openings)
    def start(self, starting_balance: int, opening: list[Op]) -> None:
        self.run = Run.start(starting_balance)
        self.run.check_no_op_rid = self.check_no_op_rid
        for op in opening:
            self.run.apply(op)

    @rule(op=grants)
    def grant(self, op: GrantOp) -> None:
        self.run.apply(op)

    @rule(op=st.builds(GrantToCapOp, st.integers(-1, 1), keys))
    def grant_to_cap(self, op: GrantToCapOp) -> None:
        self.run.apply(op)

    @rule(op=purchases)
    def purchase(self, op: PurchaseOp) -> None:
        self.run.apply(op)

    @rule(op=consumes)
    def consume(self, op: ConsumeOp) -> None:
        self.run.apply(op)

    @rule(op=st.builds(CreateProfileOp, st.sampled_from(PROFILES), st.sampled_from(GAMES)))
    def create_profile(self, op: CreateProfileOp) -> None:
        self.run.apply(op)

    @rule(op=equips)
    def equip(self, op: EquipOp) -> None:
        self.run.apply(op)

    @rule(op=unequips)
    def unequip(self, op: UnequipOp) -> None:
        self.run.apply(op)

    # Targeted rules, so that successes are not left to chance: each applies
    # only when the user has something to use, and then picks it.

    def _holds(self, fits: Callable[[ItemSpec], bool]) -> bool:
        lookup = self.run.catalog.lookup
        return any((item := lookup(sku)) and fits(item) for sku in self.run.state.inventory)

    @precondition(lambda self: self._holds(lambda item: item.kind is ItemKind.CONSUMABLE))
    @rule(op=st.builds(ConsumeOp, st.integers(0, 20), st.one_of(st.none(), st.just(1)), keys))
    def consume_held(self, op: ConsumeOp) -> None:
        self.run.apply(op)

    @precondition(lambda self: self._holds(lambda item: item.slot is not None))
    @rule(op=st.builds(EquipOp, st.integers(0, 8), st.none(), st.integers(0, 20)))
    def equip_held(self, op: EquipOp) -> None:
        self.run.apply(op)

    def _equipped_consumables(self) -> list[str]:
        """Equipped items that the second catalog turns into consumables."""
        lookup = CATALOGS[1].lookup
        return sorted(
            {
                sku
                for profile in self.run.state.profiles.values()
                for sku in profile.equipped.values()
                if (item := lookup(sku)) and item.kind is ItemKind.CONSUMABLE
            }
        )

    @precondition(lambda self: self._equipped_consumables())
    @rule(all_of_it=st.booleans(), key=keys)
    def consume_equipped(self, all_of_it: bool, key: str) -> None:
        """The catalog changes, then the player uses up an item they had equipped."""
        sku = self._equipped_consumables()[0]
        self.run.apply(SwitchCatalogOp(1))
        self.run.apply(ConsumeOp(sku, None if all_of_it else 1, key))

    @precondition(lambda self: any(p.equipped for p in self.run.state.profiles.values()))
    @rule(op=st.builds(UnequipOp, st.integers(0, 8), st.none()))
    def unequip_filled(self, op: UnequipOp) -> None:
        self.run.apply(op)

    @rule(op=st.builds(ReplayOp, st.integers(0, 1_000), st.booleans()))
    def replay(self, op: ReplayOp) -> None:
        self.run.apply(op)

    @rule(op=st.builds(SwitchCatalogOp, st.integers(0, len(CATALOGS) - 1)))
    def switch_catalog(self, op: SwitchCatalogOp) -> None:
        self.run.apply(op)

    def teardown(self) -> None:
        self.run.check_rebuild()
        if self.collector is not None:
            self.collector.update(self.run.outcomes)


FAST = settings(
    max_examples=250,
    stateful_step_count=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_random_operations_keep_the_user_consistent() -> None:
    run_state_machine_as_test(UserMachine, settings=FAST)


def test_the_machine_reaches_every_outcome() -> None:
    """Guards against strategies that silently stop exercising a path."""
    seen: Counter[str] = Counter()

    class Collecting(UserMachine):
        collector = seen

    run_state_machine_as_test(
        Collecting, settings=settings(FAST, max_examples=100, derandomize=True)
    )
    expected = {
        "Grant", "Purchase", "Consume", "CreateProfile", "Equip", "Unequip",
        "replayed", "no-op", "used up while equipped", "granted to the cap",
        *(
            code.value
            for code in (
                ErrorCode.UNKNOWN_ITEM, ErrorCode.PRICE_CHANGED, ErrorCode.INSUFFICIENT_FUNDS,
                ErrorCode.LIMIT_EXCEEDED, ErrorCode.NOT_OWNED, ErrorCode.INCOMPATIBLE,
                ErrorCode.UNKNOWN_PROFILE, ErrorCode.PROFILE_EXISTS,
                ErrorCode.IDEMPOTENCY_CONFLICT, ErrorCode.BAD_REQUEST,
            )
        ),
    }  # fmt: skip
    assert expected <= set(seen), expected - set(seen)


def test_every_reply_echoes_the_rid() -> None:
    class Echoing(UserMachine):
        check_no_op_rid = True

    run_state_machine_as_test(Echoing, settings=settings(FAST, max_examples=100))
