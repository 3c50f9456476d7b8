"""The user entity (actors/user.py) without a server: every rule of
PROTOCOL.md §3, every error code the entity produces, idempotency, pushes
(§4), the ledger, snapshots and the journal's change encoding."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import pytest

from actors.catalog import Catalog, ItemSpec, parse_catalog
from actors.catalog import demo_catalog_text as _demo_text
from actors.events import (
    Bought,
    Change,
    Credited,
    Line,
    ProfileAdded,
    SlotCleared,
    SlotFilled,
    UsedUp,
    decode_change,
    encode_change,
)
from actors.user import (
    KEYS_IN_MEMORY,
    LEDGER_IN_MEMORY,
    MAX_PROFILES,
    Holding,
    KeyRecord,
    Mutation,
    Outcome,
    Profile,
    UserState,
    evolve,
    fingerprint,
    handle,
    new_user,
    pushes,
    same_request,
    scoped_key,
)
from protocol.errors import ErrorCode, RequestError
from protocol.messages import (
    MAX_GEMS,
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
    LedgerEntry,
    LoadoutPush,
    ProfileCreated,
    Purchase,
    Purchased,
    Unequip,
    Unequipped,
)

DEMO = Catalog.from_document(1, parse_catalog(_demo_text()))
NOW = 1_700_000_000_000
USER = "alice"

# Demo catalog skus used below, with the properties the tests rely on.
DRAGON = "br.rifle.dragon"  # br, weapon_skin, 500, non-stackable, max 1
TIGER = "br.rifle.tiger"  # br, weapon_skin, 250, non-stackable, no max_quantity
CROWN = "br.hat.crown"  # br, hat, 300, non-stackable
KART = "kart.body.flame"  # kart, kart_body, 400
AVATAR = "plat.avatar.cyber"  # platform-wide, avatar, 150
FRAME = "plat.frame.gold"  # platform-wide, frame, 200
LIFE = "plat.life.extra"  # consumable, 20, stackable, max 99
#: Fingerprints of two requests as version 2 made them (see the test using them).
GOLDEN_PURCHASE = "029954f2338cb410553ff32a3c9d2d1bc7"
GOLDEN_GRANT = "02d75c700ee88339d0405353549fc7a510"
BOOSTER = "plat.booster.xp"  # consumable, 5, stackable, no max
VOUCHER = "plat.voucher.steam10"  # non-consumable, 2000, stackable, no slot
GLIDER = "br.glider.phoenix"  # coming_soon
LEGACY = "br.rifle.legacy"  # inactive


def price_of(sku: str, catalog: Catalog = DEMO) -> int:
    item = catalog.lookup(sku)
    assert item is not None
    return item.price


def user(balance: int = 0) -> UserState:
    state, _ = new_user(USER, balance, NOW)
    return state


def buy(sku: str, quantity: int = 1, key: str | None = None, rid: int | str = "r") -> Purchase:
    return Purchase(
        rid=rid, key=key or f"buy-{sku}-{quantity}", sku=sku, quantity=quantity, price=price_of(sku)
    )


def do(state: UserState, request: Mutation, catalog: Catalog = DEMO, now: int = NOW) -> Outcome:
    return handle(state, request, catalog, now)


def owning(
    *purchases: tuple[str, int], extra: int = 0, profiles: tuple[str, ...] = ()
) -> UserState:
    """A user who bought these (sku, quantity) and has ``extra`` gems left."""
    total = sum(price_of(sku) * quantity for sku, quantity in purchases)
    state = user(total + extra)
    for i, (sku, quantity) in enumerate(purchases):
        do(state, buy(sku, quantity, key=f"setup-{i}"))
    for name in profiles:
        game = None if name == "plain" else name
        do(state, CreateProfile(profile=name, game=game))
    assert state.balance == extra
    return state


@dataclass
class Seen:
    """Everything about a user that a refused request must leave alone."""

    snapshot: bytes
    version: int
    balance: int
    keys: list[tuple[str, KeyRecord]]
    keys_complete: bool
    ledger: list[LedgerEntry]

    @classmethod
    def of(cls, state: UserState) -> Seen:
        return cls(
            state.snapshot(),
            state.version,
            state.balance,
            list(state.keys.items()),
            state.keys_complete,
            list(state.ledger),
        )


def refused(
    state: UserState, request: Mutation, code: ErrorCode, catalog: Catalog = DEMO
) -> RequestError:
    before = Seen.of(state)
    with pytest.raises(RequestError) as caught:
        do(state, request, catalog)
    assert caught.value.code is code, caught.value.message
    assert Seen.of(state) == before
    return caught.value


def ledger_sum(state: UserState) -> int:
    assert state.ledger_complete
    return sum(entry.amount for entry in state.ledger)


# --------------------------------------------------------------------------- new users


def test_new_user_has_main_profile_and_ledgers_the_starting_balance() -> None:
    state, change = new_user(USER, 750, NOW)
    assert change is not None
    assert change.version == 1 and change.kind == "starting" and change.key is None
    assert change.events == [Credited(750, "starting")]
    entry = LedgerEntry(seq=1, at=NOW, kind="starting", amount=750, balance=750)
    assert change.ledger == entry
    assert list(state.ledger) == [entry]
    assert (state.version, state.balance) == (1, 750)
    assert state.profiles == {"main": Profile(None, {})}
    assert state.inventory == {}


def test_new_user_without_starting_balance_has_no_change() -> None:
    state, change = new_user(USER, 0, NOW)
    assert change is None
    assert (state.version, state.balance) == (0, 0)
    assert list(state.ledger) == []
    assert state.profiles == {"main": Profile(None, {})}


def test_state_view_of_a_new_user() -> None:
    view = user(30).view("s-1")
    assert view.rid == "s-1" and view.user == USER
    assert (view.version, view.balance, view.inventory) == (1, 30, [])
    assert [(p.profile, p.game, p.equipped) for p in view.profiles] == [("main", None, {})]


# --------------------------------------------------------------------------- purchase


def test_purchase_debits_grants_and_ledgers_together() -> None:
    state = user(1000)
    outcome = do(state, Purchase(rid=7, key="k1", sku=LIFE, quantity=3, price=20))
    change = outcome.change
    assert change is not None
    assert isinstance(outcome.reply, Purchased)
    assert outcome.reply.rid == 7
    assert (outcome.reply.sku, outcome.reply.quantity, outcome.reply.total) == (LIFE, 3, 60)
    assert (outcome.reply.balance, outcome.reply.version) == (940, 2)
    assert outcome.reply.purchase.startswith("pur_")
    assert (state.version, state.balance) == (2, 940)
    assert state.inventory == {LIFE: Holding(3)}
    assert change.version == 2 and change.kind == "purchase" and change.key == "p:k1"
    assert change.events == [
        Bought(outcome.reply.purchase, LIFE, 3, 60, None, [Line(LIFE, 3, None)])
    ]
    assert change.ledger == LedgerEntry(
        seq=2, at=NOW, kind="purchase", amount=-60, balance=940, sku=LIFE, quantity=3, key="k1"
    )
    assert state.ledger[-1] == change.ledger
    assert ledger_sum(state) == state.balance


def test_purchase_adds_to_what_is_held() -> None:
    state = owning((LIFE, 4), extra=100)
    do(state, buy(LIFE, 5, key="more"))
    assert state.inventory == {LIFE: Holding(9)}
    assert state.balance == 0


def test_purchase_ids_differ_between_purchases() -> None:
    state = user(100)
    first = do(state, buy(LIFE, key="a")).reply
    second = do(state, buy(LIFE, key="b")).reply
    assert isinstance(first, Purchased) and isinstance(second, Purchased)
    assert first.purchase != second.purchase


def test_purchase_with_exactly_the_balance_succeeds() -> None:
    state = user(500)
    do(state, buy(DRAGON))
    assert state.balance == 0
    assert DRAGON in state.inventory


def test_purchase_of_a_missing_sku_is_unknown_item() -> None:
    refused(user(10_000), Purchase(key="k", sku="no.such.sku", price=1), ErrorCode.UNKNOWN_ITEM)


@pytest.mark.parametrize("sku", [GLIDER, LEGACY], ids=["coming_soon", "inactive"])
def test_purchase_of_an_item_not_active_is_unknown_item(sku: str) -> None:
    refused(user(10_000), buy(sku), ErrorCode.UNKNOWN_ITEM)


@pytest.mark.parametrize("shown", [0, 499, 501], ids=["zero", "lower", "higher"])
def test_purchase_at_a_price_not_current_is_price_changed(shown: int) -> None:
    refused(user(10_000), Purchase(key="k", sku=DRAGON, price=shown), ErrorCode.PRICE_CHANGED)


def test_purchase_beyond_the_balance_is_insufficient_funds() -> None:
    refused(user(499), buy(DRAGON), ErrorCode.INSUFFICIENT_FUNDS)


def test_insufficient_funds_counts_the_quantity() -> None:
    refused(user(59), buy(LIFE, 3), ErrorCode.INSUFFICIENT_FUNDS)


def test_purchase_up_to_max_quantity_then_limit_exceeded() -> None:
    state = user(10_000)
    do(state, buy(LIFE, 98, key="k98"))
    do(state, buy(LIFE, 1, key="k1"))
    assert state.inventory[LIFE].quantity == 99
    refused(state, buy(LIFE, 1, key="k-over"), ErrorCode.LIMIT_EXCEEDED)


def test_purchase_of_more_than_max_quantity_at_once_is_limit_exceeded() -> None:
    refused(user(10_000), buy(LIFE, 100), ErrorCode.LIMIT_EXCEEDED)


def test_stackable_item_without_max_quantity_has_no_small_limit() -> None:
    state = user(10_000)
    do(state, buy(BOOSTER, 1000))
    assert state.inventory[BOOSTER].quantity == 1000


@pytest.mark.parametrize("sku", [DRAGON, TIGER], ids=["max_quantity_1", "no_max_quantity"])
def test_non_stackable_item_already_held_is_limit_exceeded(sku: str) -> None:
    state = owning((sku, 1), extra=10_000)
    refused(state, buy(sku, key="again"), ErrorCode.LIMIT_EXCEEDED)


@pytest.mark.parametrize("sku", [DRAGON, TIGER], ids=["max_quantity_1", "no_max_quantity"])
def test_non_stackable_item_bought_more_than_one_at_a_time_is_limit_exceeded(sku: str) -> None:
    refused(user(10_000), buy(sku, 2), ErrorCode.LIMIT_EXCEEDED)


@pytest.mark.parametrize(
    ("request_", "balance", "code"),
    [
        (Purchase(key="k", sku=LEGACY, price=1), 0, ErrorCode.UNKNOWN_ITEM),
        (Purchase(key="k", sku=DRAGON, price=1), 0, ErrorCode.PRICE_CHANGED),
        (Purchase(key="k", sku=DRAGON, price=500, quantity=2), 0, ErrorCode.LIMIT_EXCEEDED),
        (Purchase(key="k", sku=LIFE, price=20, quantity=100), 0, ErrorCode.LIMIT_EXCEEDED),
    ],
    ids=["inactive_before_price", "price_before_funds", "nonstackable_before_funds", "max_first"],
)
def test_purchase_rules_are_checked_in_protocol_order(
    request_: Purchase, balance: int, code: ErrorCode
) -> None:
    refused(user(balance), request_, code)


def test_purchase_after_a_price_change_uses_the_new_price() -> None:
    v2 = Catalog.from_document(2, parse_catalog(_demo_text().replace("price = 500", "price = 450")))
    assert price_of(DRAGON, v2) == 450
    state = user(1000)
    refused(state, Purchase(key="k", sku=DRAGON, price=500), ErrorCode.PRICE_CHANGED, v2)
    do(state, Purchase(key="k", sku=DRAGON, price=450), v2)
    assert state.balance == 550


# --------------------------------------------------------------------------- grant


def test_grant_credits_ledgers_and_pushes_the_balance() -> None:
    state = user(10)
    outcome = do(state, Grant(rid="g", user=USER, amount=90, key="gift", reason="support"))
    assert outcome.reply == Granted(rid="g", user=USER, balance=100, version=2)
    assert (state.version, state.balance) == (2, 100)
    change = outcome.change
    assert change is not None and change.kind == "grant" and change.key == "a:gift"
    assert change.events == [Credited(90, "grant", "support")]
    assert change.ledger == LedgerEntry(
        seq=2, at=NOW, kind="grant", amount=90, balance=100, key="gift"
    )
    assert outcome.pushes == [InventoryPush(version=2, balance=100, items=[])]
    assert ledger_sum(state) == 100


def test_grant_up_to_the_balance_cap_then_limit_exceeded() -> None:
    state = user(MAX_GEMS - 10)
    do(state, Grant(user=USER, amount=10, key="fill"))
    assert state.balance == MAX_GEMS
    refused(state, Grant(user=USER, amount=1, key="over"), ErrorCode.LIMIT_EXCEEDED)


def test_grant_past_the_balance_cap_is_limit_exceeded() -> None:
    refused(user(MAX_GEMS - 10), Grant(user=USER, amount=11, key="g"), ErrorCode.LIMIT_EXCEEDED)


# --------------------------------------------------------------------------- consume


def test_consume_uses_up_and_replies_what_remains() -> None:
    state = owning((LIFE, 3), extra=7)
    version = state.version
    outcome = do(state, Consume(rid=3, key="c", sku=LIFE, quantity=2))
    assert outcome.reply == Consumed(rid=3, sku=LIFE, quantity=1, version=version + 1)
    assert state.inventory == {LIFE: Holding(1)}
    assert state.balance == 7
    change = outcome.change
    assert change is not None and change.kind == "consume" and change.key == "p:c"
    assert change.events == [UsedUp(LIFE, 2)]
    assert change.ledger is None
    assert outcome.pushes == [InventoryPush(version + 1, 7, [InventoryEntry(LIFE, 1)])]


def test_consuming_the_last_unit_removes_the_item() -> None:
    state = owning((LIFE, 2), (FRAME, 1))
    outcome = do(state, Consume(key="c", sku=LIFE, quantity=2))
    assert isinstance(outcome.reply, Consumed) and outcome.reply.quantity == 0
    assert LIFE not in state.inventory
    assert state.inventory == {FRAME: Holding(1)}
    assert outcome.pushes == [InventoryPush(state.version, 0, [InventoryEntry(LIFE, 0)])]


def test_consuming_the_last_unit_unequips_it_everywhere() -> None:
    # Consumables cannot be equipped, but an item can become one in a later
    # catalog; the rule "an item that leaves the inventory is unequipped
    # everywhere" still holds.  Build such a state by hand.
    state = UserState(
        USER,
        version=5,
        balance=40,
        inventory={LIFE: Holding(1), FRAME: Holding(1)},
        profiles={
            "main": Profile(None, {"avatar": LIFE, "frame": FRAME}),
            "br": Profile("br", {"hat": LIFE}),
            "kart": Profile("kart", {}),
        },
    )
    outcome = do(state, Consume(key="c", sku=LIFE))
    change = outcome.change
    assert change is not None and change.version == 6
    assert change.events == [
        SlotCleared("main", "avatar"),
        SlotCleared("br", "hat"),
        UsedUp(LIFE, 1),
    ]
    assert state.inventory == {FRAME: Holding(1)}
    assert state.profiles == {
        "main": Profile(None, {"frame": FRAME}),
        "br": Profile("br", {}),
        "kart": Profile("kart", {}),
    }
    inventory = [p for p in outcome.pushes if isinstance(p, InventoryPush)]
    loadouts = sorted(
        (p for p in outcome.pushes if isinstance(p, LoadoutPush)), key=lambda p: p.profile
    )
    assert inventory == [InventoryPush(6, 40, [InventoryEntry(LIFE, 0)])]
    assert loadouts == [
        LoadoutPush(version=6, profile="br", game="br", equipped={}),
        LoadoutPush(version=6, profile="main", game=None, equipped={"frame": FRAME}),
    ]
    assert len(outcome.pushes) == 3


def test_consuming_some_of_an_equipped_item_keeps_it_equipped() -> None:
    state = UserState(
        USER,
        version=5,
        inventory={LIFE: Holding(2)},
        profiles={"main": Profile(None, {"avatar": LIFE})},
    )
    outcome = do(state, Consume(key="c", sku=LIFE))
    assert outcome.change is not None
    assert outcome.change.events == [UsedUp(LIFE, 1)]
    assert state.profiles["main"].equipped == {"avatar": LIFE}
    assert not any(isinstance(p, LoadoutPush) for p in outcome.pushes)


def test_slot_cleared_in_a_change_unequips_through_evolve() -> None:
    state = UserState(
        USER,
        version=1,
        inventory={LIFE: Holding(1)},
        profiles={"main": Profile(None, {"avatar": LIFE})},
    )
    change = Change(2, NOW, "consume", [SlotCleared("main", "avatar"), UsedUp(LIFE, 1)])
    evolve(state, change)
    assert state.inventory == {}
    assert state.profiles["main"].equipped == {}
    assert state.version == 2
    assert pushes(state, change) == [
        InventoryPush(2, 0, [InventoryEntry(LIFE, 0)]),
        LoadoutPush(version=2, profile="main", game=None, equipped={}),
    ]


@pytest.mark.parametrize("held", [True, False], ids=["held", "not_held"])
def test_consume_of_a_non_consumable_is_incompatible(held: bool) -> None:
    state = owning((FRAME, 1)) if held else user(1000)
    refused(state, Consume(key="c", sku=FRAME), ErrorCode.INCOMPATIBLE)


def test_consume_of_a_consumable_not_held_is_not_owned() -> None:
    refused(owning((BOOSTER, 1)), Consume(key="c", sku=LIFE), ErrorCode.NOT_OWNED)


def test_consume_of_more_than_held_is_not_owned() -> None:
    state = owning((LIFE, 2))
    refused(state, Consume(key="c", sku=LIFE, quantity=3), ErrorCode.NOT_OWNED)
    assert state.inventory[LIFE].quantity == 2


def test_consume_of_a_missing_sku_is_unknown_item() -> None:
    refused(user(100), Consume(key="c", sku="no.such.sku"), ErrorCode.UNKNOWN_ITEM)


# --------------------------------------------------------------------------- profiles


def test_create_profile_adds_it_and_pushes_its_loadout() -> None:
    state = user()
    outcome = do(state, CreateProfile(rid=1, profile="racing", game="kart"))
    assert outcome.reply == ProfileCreated(rid=1, profile="racing", game="kart", version=1)
    assert state.profiles["racing"] == Profile("kart", {})
    assert outcome.change is not None and outcome.change.events == [ProfileAdded("racing", "kart")]
    assert outcome.pushes == [LoadoutPush(version=1, profile="racing", game="kart", equipped={})]


def test_create_profile_platform_wide() -> None:
    state = user()
    do(state, CreateProfile(profile="second", game=None))
    assert state.profiles["second"] == Profile(None, {})


def test_create_profile_with_a_taken_name_is_profile_exists() -> None:
    state = user()
    refused(state, CreateProfile(profile="main", game="br"), ErrorCode.PROFILE_EXISTS)
    do(state, CreateProfile(profile="br", game="br"))
    refused(state, CreateProfile(profile="br", game=None), ErrorCode.PROFILE_EXISTS)


def test_create_profile_for_an_unknown_game_is_bad_request() -> None:
    refused(user(), CreateProfile(profile="x", game="chess"), ErrorCode.BAD_REQUEST)


def test_too_many_profiles_is_limit_exceeded() -> None:
    state = user()
    for i in range(MAX_PROFILES - 1):
        do(state, CreateProfile(profile=f"p{i}"))
    assert len(state.profiles) == MAX_PROFILES
    refused(state, CreateProfile(profile="one-more"), ErrorCode.LIMIT_EXCEEDED)


# --------------------------------------------------------------------------- equip


def test_equip_fills_the_slot_and_pushes_the_loadout() -> None:
    state = owning((DRAGON, 1), profiles=("br",))
    version = state.version
    outcome = do(state, Equip(rid="e", profile="br", slot="weapon_skin", sku=DRAGON))
    assert outcome.reply == Equipped(
        rid="e", profile="br", slot="weapon_skin", sku=DRAGON, version=version + 1
    )
    assert state.profiles["br"].equipped == {"weapon_skin": DRAGON}
    assert outcome.change is not None
    assert outcome.change.events == [SlotFilled("br", "weapon_skin", DRAGON)]
    assert outcome.pushes == [
        LoadoutPush(version=version + 1, profile="br", game="br", equipped={"weapon_skin": DRAGON})
    ]
    assert state.inventory[DRAGON] == Holding(1)  # equipping keeps the item held


def test_equip_replaces_what_the_slot_held() -> None:
    state = owning((DRAGON, 1), (TIGER, 1), profiles=("br",))
    do(state, Equip(profile="br", slot="weapon_skin", sku=DRAGON))
    do(state, Equip(profile="br", slot="weapon_skin", sku=TIGER))
    assert state.profiles["br"].equipped == {"weapon_skin": TIGER}


def test_platform_item_equips_on_any_profile() -> None:
    state = owning((AVATAR, 1), profiles=("br", "kart"))
    for name in ("main", "br", "kart"):
        do(state, Equip(profile=name, slot="avatar", sku=AVATAR))
        assert state.profiles[name].equipped == {"avatar": AVATAR}


def test_equip_on_a_missing_profile_is_unknown_profile() -> None:
    state = owning((FRAME, 1))
    refused(state, Equip(profile="ghost", slot="frame", sku=FRAME), ErrorCode.UNKNOWN_PROFILE)


def test_equip_of_an_item_not_held_is_not_owned() -> None:
    refused(user(1000), Equip(profile="main", slot="frame", sku=FRAME), ErrorCode.NOT_OWNED)


@pytest.mark.parametrize("profile", ["main", "kart"], ids=["platform_profile", "other_game"])
def test_equip_for_the_wrong_game_is_incompatible(profile: str) -> None:
    state = owning((DRAGON, 1), profiles=("kart",))
    refused(state, Equip(profile=profile, slot="weapon_skin", sku=DRAGON), ErrorCode.INCOMPATIBLE)


@pytest.mark.parametrize(
    ("sku", "slot"), [(DRAGON, "hat"), (FRAME, "avatar"), (VOUCHER, "frame")],
    ids=["game_item", "platform_item", "item_without_slot"],
)  # fmt: skip
def test_equip_in_the_wrong_slot_is_incompatible(sku: str, slot: str) -> None:
    if sku == VOUCHER:  # no longer held when bought (an order); held from before
        state = owning(profiles=("br",))
        state.inventory[VOUCHER] = Holding(1)
    else:
        state = owning((sku, 1), profiles=("br",))
    refused(state, Equip(profile="br", slot=slot, sku=sku), ErrorCode.INCOMPATIBLE)


def test_equip_of_a_consumable_is_incompatible() -> None:
    state = owning((LIFE, 1))
    refused(state, Equip(profile="main", slot="utility", sku=LIFE), ErrorCode.INCOMPATIBLE)


def test_a_consumable_cannot_be_equipped_even_in_its_slot() -> None:
    # parse_catalog refuses a consumable with a slot; the entity enforces the
    # rule on its own too (PROTOCOL.md §3, "consumables cannot be equipped").
    charm = ItemSpec(sku="odd.charm", name="Odd", kind=ItemKind.CONSUMABLE, price=1, slot="charm")
    odd = Catalog(1, {}, {charm.sku: charm})
    state = UserState(
        USER, version=1, inventory={charm.sku: Holding(1)}, profiles={"main": Profile(None)}
    )
    refused(state, Equip(profile="main", slot="charm", sku=charm.sku), ErrorCode.INCOMPATIBLE, odd)


def test_equip_of_what_is_already_equipped_changes_nothing() -> None:
    state = owning((FRAME, 1))
    do(state, Equip(profile="main", slot="frame", sku=FRAME))
    before = Seen.of(state)
    outcome = do(state, Equip(rid=9, profile="main", slot="frame", sku=FRAME))
    assert outcome.change is None and outcome.pushes == []
    assert isinstance(outcome.reply, Equipped) and outcome.reply.version == before.version
    assert Seen.of(state) == before


# --------------------------------------------------------------------------- unequip


def test_unequip_clears_the_slot_and_pushes_the_loadout() -> None:
    state = owning((FRAME, 1), (AVATAR, 1))
    do(state, Equip(profile="main", slot="frame", sku=FRAME))
    do(state, Equip(profile="main", slot="avatar", sku=AVATAR))
    outcome = do(state, Unequip(rid=4, profile="main", slot="frame"))
    assert outcome.reply == Unequipped(rid=4, profile="main", slot="frame", version=state.version)
    assert state.profiles["main"].equipped == {"avatar": AVATAR}
    assert outcome.change is not None
    assert outcome.change.events == [SlotCleared("main", "frame")]
    assert outcome.pushes == [
        LoadoutPush(version=state.version, profile="main", game=None, equipped={"avatar": AVATAR})
    ]
    assert FRAME in state.inventory  # unequipping keeps the item held


def test_unequip_on_a_missing_profile_is_unknown_profile() -> None:
    refused(user(), Unequip(profile="ghost", slot="frame"), ErrorCode.UNKNOWN_PROFILE)


def test_unequip_of_an_empty_slot_changes_nothing() -> None:
    state = user(5)
    before = Seen.of(state)
    outcome = do(state, Unequip(profile="main", slot="frame"))
    assert outcome.change is None and outcome.pushes == []
    assert isinstance(outcome.reply, Unequipped) and outcome.reply.version == before.version
    assert Seen.of(state) == before


NO_OP_RID_BUG = (
    "actors/user.py handle(): when _decide returns no events, the reply is built by "
    "_reply() without rid and returned as-is, so the client's rid is lost (PROTOCOL.md §2)"
)


def test_equip_of_what_is_already_equipped_echoes_the_rid() -> None:
    state = owning((FRAME, 1))
    do(state, Equip(rid=1, profile="main", slot="frame", sku=FRAME))
    outcome = do(state, Equip(rid=2, profile="main", slot="frame", sku=FRAME))
    assert outcome.reply.rid == 2


def test_unequip_of_an_empty_slot_echoes_the_rid() -> None:
    outcome = do(user(), Unequip(rid="u-1", profile="main", slot="frame"))
    assert outcome.reply.rid == "u-1"


# --------------------------------------------------------------------------- idempotency

KEYED: list[tuple[str, Mutation, Mutation]] = [
    (
        "purchase",
        Purchase(rid=1, key="k", sku=LIFE, quantity=2, price=20),
        Purchase(rid=2, key="k", sku=LIFE, quantity=2, price=20),
    ),
    ("consume", Consume(rid=1, key="k", sku=BOOSTER), Consume(rid="again", key="k", sku=BOOSTER)),
    (
        "grant",
        Grant(rid=1, user=USER, amount=5, key="k", reason="r"),
        Grant(rid=None, user=USER, amount=5, key="k", reason="r"),
    ),
]


@pytest.mark.parametrize(("first", "again"), [k[1:] for k in KEYED], ids=[k[0] for k in KEYED])
def test_replay_returns_the_original_reply_and_changes_nothing(
    first: Mutation, again: Mutation
) -> None:
    state = owning((BOOSTER, 3), extra=100)
    original = do(state, first)
    assert original.change is not None
    before = Seen.of(state)
    inventory = {sku: Holding(h.quantity, h.expires_at) for sku, h in state.inventory.items()}
    replay = do(state, again)
    assert replay.reply == msgspec.structs.replace(original.reply, rid=again.rid)
    assert replay.change is None
    assert replay.pushes == []
    assert Seen.of(state) == before
    assert state.inventory == inventory


def test_replayed_purchase_keeps_its_id_and_total_after_a_price_change() -> None:
    v2 = Catalog.from_document(2, parse_catalog(_demo_text().replace("price = 500", "price = 450")))
    state = user(1000)
    original = do(state, Purchase(rid=1, key="k", sku=DRAGON, price=500))
    replay = do(state, Purchase(rid=2, key="k", sku=DRAGON, price=500), v2)
    assert isinstance(original.reply, Purchased) and isinstance(replay.reply, Purchased)
    assert replay.reply.purchase == original.reply.purchase
    assert replay.reply.total == 500 and replay.reply.balance == 500
    assert replay.reply.rid == 2
    assert state.balance == 500


@pytest.mark.parametrize(
    "other",
    [
        Purchase(key="k", sku=LIFE, quantity=3, price=20),
        Purchase(key="k", sku=BOOSTER, quantity=2, price=5),
        Purchase(key="k", sku=LIFE, quantity=2, price=21),
        Consume(key="k", sku=LIFE),
    ],
    ids=["quantity", "sku", "price", "other_request"],
)
def test_same_key_for_a_different_request_is_idempotency_conflict(other: Mutation) -> None:
    state = user(1000)
    do(state, Purchase(key="k", sku=LIFE, quantity=2, price=20))
    refused(state, other, ErrorCode.IDEMPOTENCY_CONFLICT)


def test_same_grant_key_with_a_different_amount_is_idempotency_conflict() -> None:
    state = user()
    do(state, Grant(user=USER, amount=5, key="g"))
    refused(state, Grant(user=USER, amount=6, key="g"), ErrorCode.IDEMPOTENCY_CONFLICT)


def test_conflict_is_checked_before_the_rules() -> None:
    # The second request would also be refused for the price; the key decides first.
    state = user(1000)
    do(state, Purchase(key="k", sku=LIFE, price=20))
    refused(state, Purchase(key="k", sku=LIFE, price=1), ErrorCode.IDEMPOTENCY_CONFLICT)


def test_a_refused_request_does_not_use_up_its_key() -> None:
    # "unavailable ... retry with the same key" (PROTOCOL.md §5): refusals are not remembered.
    state = user(10)
    refused(state, buy(DRAGON, key="k"), ErrorCode.INSUFFICIENT_FUNDS)
    assert "p:k" not in state.keys
    do(state, Grant(user=USER, amount=490, key="top-up"))
    outcome = do(state, buy(DRAGON, key="k"))
    assert outcome.change is not None
    assert DRAGON in state.inventory


def test_grant_keys_and_player_keys_do_not_collide() -> None:
    state = user(100)
    do(state, Grant(user=USER, amount=50, key="same"))
    purchase = do(state, Purchase(key="same", sku=LIFE, price=20))
    assert purchase.change is not None
    grant = do(state, Grant(user=USER, amount=7, key="other"))
    consume = do(state, Consume(key="other", sku=LIFE))
    assert grant.change is not None and consume.change is not None
    assert set(state.keys) == {"a:same", "p:same", "a:other", "p:other"}
    assert state.balance == 100 + 50 - 20 + 7


def test_scoped_key_keeps_operators_and_players_apart() -> None:
    assert scoped_key(Grant(user=USER, amount=1, key="x")) == "a:x"
    assert scoped_key(Purchase(key="x", sku=LIFE, price=20)) == "p:x"
    assert scoped_key(Consume(key="x", sku=LIFE)) == "p:x"
    assert scoped_key(CreateProfile(profile="x")) is None
    assert scoped_key(Equip(profile="main", slot="frame", sku=FRAME)) is None
    assert scoped_key(Unequip(profile="main", slot="frame")) is None


def test_ledger_keys_are_the_client_keys_without_scope() -> None:
    state = user(100)
    do(state, Grant(user=USER, amount=1, key="g-1"))
    do(state, Purchase(key="p-1", sku=LIFE, price=20))
    assert [e.key for e in state.ledger] == [None, "g-1", "p-1"]


def test_fingerprint_ignores_the_rid_only() -> None:
    base = Purchase(rid=1, key="k", sku=LIFE, quantity=1, price=20)
    assert fingerprint(base) == fingerprint(msgspec.structs.replace(base, rid="other"))
    assert fingerprint(base) == fingerprint(Purchase(key="k", sku=LIFE, price=20))
    for change in ({"key": "k2"}, {"sku": BOOSTER}, {"quantity": 2}, {"price": 21}):
        assert fingerprint(base) != fingerprint(msgspec.structs.replace(base, **change))
    assert fingerprint(Consume(key="k", sku=LIFE)) != fingerprint(
        Purchase(key="k", sku=LIFE, price=0)
    )


def test_keys_leave_memory_only_once_durable_and_beyond_the_window() -> None:
    state = user()
    for i in range(KEYS_IN_MEMORY + 10):
        do(state, Grant(user=USER, amount=1, key=f"g{i}"))
    # Nothing is durable yet: every key stays reachable in memory.
    assert state.trim_keys() == 0
    assert len(state.keys) == KEYS_IN_MEMORY + 10 and state.keys_complete
    state.mark_durable(5)  # versions 1-5 durable: only those may go
    assert state.trim_keys() == 5
    assert "a:g4" not in state.keys and "a:g5" in state.keys
    assert not state.keys_complete
    state.mark_durable(state.version)
    assert state.trim_keys() == 5
    assert len(state.keys) == KEYS_IN_MEMORY
    assert "a:g9" not in state.keys and f"a:g{KEYS_IN_MEMORY + 9}" in state.keys
    assert state.balance == KEYS_IN_MEMORY + 10


def test_a_key_loaded_back_is_replayed() -> None:
    # The shard reads a key that left memory back from the journal and
    # ``remember``s it before calling ``handle``; the replay is answered from it.
    state = user(100)
    first = do(state, Purchase(rid=1, key="k", sku=LIFE, price=20))
    assert first.change is not None and first.change.reply is not None
    assert first.change.fingerprint is not None
    record = KeyRecord(first.change.fingerprint, first.change.reply, first.change.version)
    restored = UserState.restore(USER, state.version, state.balance, state.snapshot())
    assert restored.keys == {} and restored.durable_version == state.version
    restored.remember("p:k", record)
    replay = do(restored, Purchase(rid=2, key="k", sku=LIFE, price=20))
    assert replay.change is None
    assert replay.reply == msgspec.structs.replace(first.reply, rid=2)
    assert restored.inventory == {LIFE: Holding(1)}
    with pytest.raises(RequestError) as conflict:
        do(restored, Purchase(rid=3, key="k", sku=LIFE, price=20, quantity=2))
    assert conflict.value.code is ErrorCode.IDEMPOTENCY_CONFLICT


def test_fingerprints_are_versioned_and_fixed_by_the_canonical_fields() -> None:
    # A fingerprint is kept in the journal for as long as its key: it must not
    # change with the code.  These values were computed when version 2 was
    # introduced; a failure here means retries after a deploy would conflict.
    purchase = Purchase(rid=9, key="k", sku=LIFE, price=20)
    assert fingerprint(purchase).hex() == GOLDEN_PURCHASE
    grant = Grant(user=USER, amount=5, key="g", reason="r")
    assert fingerprint(grant).hex() == GOLDEN_GRANT


def test_a_fingerprint_from_before_versions_still_matches_its_request() -> None:
    import hashlib

    purchase = Purchase(rid=1, key="k", sku=LIFE, price=20)
    body = msgspec.msgpack.encode(msgspec.structs.replace(purchase, rid=None))
    legacy = hashlib.blake2b(body, digest_size=16).digest()
    assert same_request(legacy, msgspec.structs.replace(purchase, rid=5))
    assert not same_request(legacy, msgspec.structs.replace(purchase, price=21))
    assert same_request(fingerprint(purchase), purchase)


def test_history_beyond_the_memory_tail_is_marked_incomplete() -> None:
    """Regression (issue exactly-once, 5): a user created in this process kept
    ``ledger_complete`` after its oldest entries left the in-memory tail, so
    ``history`` stopped at 200 entries."""
    state = user()
    for i in range(LEDGER_IN_MEMORY):
        do(state, Grant(user=USER, amount=1, key=f"g{i}"))
    assert state.ledger_complete and len(state.ledger) == LEDGER_IN_MEMORY
    do(state, Grant(user=USER, amount=1, key="one-more"))
    assert not state.ledger_complete and len(state.ledger) == LEDGER_IN_MEMORY


# --------------------------------------------------------------------------- pushes


def test_purchase_pushes_only_the_changed_inventory_entry() -> None:
    state = owning((LIFE, 2), (FRAME, 1), extra=100)
    outcome = do(state, buy(LIFE, 3, key="more"))
    assert outcome.pushes == [InventoryPush(state.version, 40, [InventoryEntry(LIFE, 5)])]


def test_consume_pushes_only_the_changed_inventory_entry() -> None:
    state = owning((LIFE, 2), (BOOSTER, 4))
    outcome = do(state, Consume(key="c", sku=BOOSTER, quantity=1))
    assert outcome.pushes == [InventoryPush(state.version, 0, [InventoryEntry(BOOSTER, 3)])]


def test_loadout_changes_push_no_inventory() -> None:
    state = owning((FRAME, 1))
    for request in (
        CreateProfile(profile="br", game="br"),
        Equip(profile="br", slot="frame", sku=FRAME),
        Unequip(profile="br", slot="frame"),
    ):
        outcome = do(state, request)
        assert len(outcome.pushes) == 1
        assert isinstance(outcome.pushes[0], LoadoutPush)
        assert outcome.pushes[0].version == state.version


def test_push_versions_follow_the_user_version() -> None:
    state = user(1000)
    versions: list[int] = []
    for request in (
        Grant(user=USER, amount=1, key="g"),
        buy(LIFE, key="b"),
        Consume(key="c", sku=LIFE),
        CreateProfile(profile="x"),
    ):
        (push,) = do(state, request).pushes
        assert isinstance(push, InventoryPush | LoadoutPush)
        versions.append(push.version)
    assert versions == [2, 3, 4, 5]


# --------------------------------------------------------------------------- ledger, journal


def scripted_user() -> tuple[UserState, list[Change]]:
    """A user with some of everything, and every change that made it."""
    state, first = new_user(USER, 2000, NOW)
    assert first is not None
    changes = [first]
    for i, request in enumerate(
        [
            Purchase(key="a", sku=LIFE, quantity=5, price=20),
            Purchase(key="b", sku=DRAGON, price=500),
            Purchase(key="c", sku=AVATAR, price=150),
            CreateProfile(profile="br", game="br"),
            Equip(profile="br", slot="weapon_skin", sku=DRAGON),
            Equip(profile="main", slot="avatar", sku=AVATAR),
            Equip(profile="br", slot="avatar", sku=AVATAR),
            Consume(key="d", sku=LIFE, quantity=2),
            Grant(user=USER, amount=300, key="e", reason="event"),
            Unequip(profile="main", slot="avatar"),
            Consume(key="f", sku=LIFE, quantity=3),
        ]
    ):
        outcome = do(state, request, now=NOW + i)
        assert outcome.change is not None
        changes.append(outcome.change)
    return state, changes


def test_ledger_sums_to_the_balance() -> None:
    state, changes = scripted_user()
    assert state.balance == 2000 - 100 - 500 - 150 + 300
    assert ledger_sum(state) == state.balance
    assert sum(c.ledger.amount for c in changes if c.ledger) == state.balance
    assert [e.balance for e in state.ledger] == [2000, 1900, 1400, 1250, 1550]


def test_versions_grow_by_one_per_change() -> None:
    state, changes = scripted_user()
    assert [c.version for c in changes] == list(range(1, len(changes) + 1))
    assert state.version == len(changes)


def test_replaying_the_changes_rebuilds_the_user() -> None:
    state, changes = scripted_user()
    rebuilt = UserState(USER, profiles={"main": Profile(None)})
    for change in changes:
        evolve(rebuilt, decode_change(encode_change(change)))
    assert rebuilt.snapshot() == state.snapshot()
    assert (rebuilt.version, rebuilt.balance) == (state.version, state.balance)
    assert list(rebuilt.ledger) == list(state.ledger)
    assert rebuilt.view() == state.view()


def test_evolve_refuses_a_change_out_of_order() -> None:
    state = user(10)
    with pytest.raises(ValueError):
        evolve(state, Change(3, NOW, "grant", [Credited(1, "grant")]))
    with pytest.raises(ValueError):
        evolve(state, Change(1, NOW, "grant", [Credited(1, "grant")]))
    assert (state.version, state.balance) == (1, 10)


def test_encode_and_decode_change_round_trip() -> None:
    _, changes = scripted_user()
    kinds = {type(e) for c in changes for e in c.events}
    assert kinds == {Credited, Bought, UsedUp, ProfileAdded, SlotFilled, SlotCleared}
    for change in changes:
        back = decode_change(encode_change(change))
        assert back == change
        assert [type(e) for e in back.events] == [type(e) for e in change.events]
        assert type(back.reply) is type(change.reply)
    keyed = [c for c in changes if c.key is not None]
    assert keyed and all(c.fingerprint and c.reply is not None for c in keyed)


def test_snapshot_and_restore_round_trip() -> None:
    state, _ = scripted_user()
    state.inventory[VOUCHER] = Holding(2, expires_at=NOW + 1000)
    restored = UserState.restore(USER, state.version, state.balance, state.snapshot())
    assert restored.snapshot() == state.snapshot()
    assert restored.view() == state.view()
    assert restored.inventory == state.inventory
    assert restored.profiles == state.profiles
    assert (restored.version, restored.balance) == (state.version, state.balance)
    # What restore cannot know is marked as such, for the shard to load from the journal.
    assert not restored.keys_complete and not restored.ledger_complete


def test_restored_user_carries_on() -> None:
    state, _ = scripted_user()
    restored = UserState.restore(USER, state.version, state.balance, state.snapshot())
    outcome = do(restored, Equip(profile="main", slot="avatar", sku=AVATAR))
    assert outcome.change is not None and outcome.change.version == state.version + 1
    refused(restored, buy(DRAGON, key="again"), ErrorCode.LIMIT_EXCEEDED)
    assert restored.profiles["main"].equipped == {"avatar": AVATAR}
    assert state.profiles["main"].equipped == {}  # the original is not shared


def test_journal_records_survive_fields_added_before_and_after() -> None:
    """A change record is durable: one written before a trailing field was
    added decodes with the field's default, and one written by a later
    version with a field this code does not know decodes too."""
    state = user(100)
    outcome = do(state, Purchase(rid=1, key="k", sku=LIFE, price=20))
    change = outcome.change
    assert change is not None
    fields = msgspec.msgpack.decode(encode_change(change))
    later = msgspec.msgpack.encode([*fields, "a field from the future"])
    assert decode_change(later) == change
    earlier = msgspec.msgpack.encode(fields[:-1])  # before ``ledger`` existed
    assert decode_change(earlier) == msgspec.structs.replace(change, ledger=None)
