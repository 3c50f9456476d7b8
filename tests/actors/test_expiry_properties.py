"""Property tests of time-limited items (PROTOCOL.md §10): whatever the
purchases, equips and passing of time, nothing expired stays held or
equipped, buying again extends the expiry, and the journal rebuilds it all."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from actors.catalog import Catalog, demo_catalog_text, parse_catalog
from actors.events import Change
from actors.user import evolve, expire_due, handle, new_user
from protocol.errors import RequestError
from protocol.messages import Equip, Purchase

EXTRA = """
[[items]]
sku = "x.badge"
name = "Flash Badge"
kind = "non_consumable"
price = 1
slot = "badge"
duration = "30s"

[[items]]
sku = "x.fuel"
name = "Timed Fuel"
kind = "consumable"
price = 1
stackable = true
max_quantity = 50
duration = "1m"
"""
CATALOG = Catalog.from_document(1, parse_catalog(demo_catalog_text() + EXTRA))
START = 1_800_000_000_000

ops = st.lists(
    st.one_of(
        st.tuples(st.just("wait"), st.integers(0, 70_000)),
        st.tuples(st.just("buy"), st.sampled_from(["x.badge", "x.fuel", "br.skin.ghost.trial"])),
        st.tuples(st.just("equip"), st.sampled_from(["x.badge", "br.skin.ghost.trial"])),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops=ops)
def test_expiry_invariants(ops: list[tuple[str, object]]) -> None:
    state, first = new_user("u", 10_000, START)
    changes: list[Change] = [first] if first else []
    now = START
    n = 0
    for op, arg in ops:
        if op == "wait":
            assert isinstance(arg, int)
            now += arg
        # The shard expires what is due before anything else (actors.shard.host).
        expired = expire_due(state, now)
        if expired is not None:
            changes.append(expired)
        for sku, held in state.inventory.items():
            assert held.expires_at is None or held.expires_at > now, sku
        if op == "buy":
            n += 1
            item = CATALOG.items[str(arg)]
            held_before = state.inventory.get(item.sku)
            expiry_before = held_before.expires_at if held_before is not None else None
            try:
                out = handle(
                    state, Purchase(key=f"k{n}", sku=item.sku, price=item.price), CATALOG, now
                )
            except RequestError:
                continue
            assert out.change is not None
            changes.append(out.change)
            after = state.inventory[item.sku]
            lifetime = item.duration_ms
            assert lifetime is not None and after.expires_at is not None
            if expiry_before is not None:
                assert after.expires_at == expiry_before + lifetime  # extended
            else:
                assert after.expires_at == now + lifetime
        elif op == "equip":
            item = CATALOG.items[str(arg)]
            if state.profiles["main"].game is None and item.game is not None:
                continue
            try:
                out = handle(
                    state, Equip(profile="main", slot=str(item.slot), sku=item.sku), CATALOG, now
                )
            except RequestError:
                continue
            if out.change is not None:
                changes.append(out.change)
        for profile in state.profiles.values():
            for sku in profile.equipped.values():
                assert sku in state.inventory
    rebuilt, _ = new_user("u", 10_000, START)
    for change in changes[1:] if first else changes:
        evolve(rebuilt, change)
    assert rebuilt.snapshot() == state.snapshot() and rebuilt.version == state.version


def test_expiry_unequips_and_pushes() -> None:
    from actors.user import pushes

    state, _ = new_user("u", 100, START)
    handle(state, Purchase(key="b", sku="x.badge", price=1), CATALOG, START)
    handle(state, Equip(profile="main", slot="badge", sku="x.badge"), CATALOG, START)
    assert expire_due(state, START + 29_999) is None
    change = expire_due(state, START + 30_000)
    assert change is not None and "x.badge" not in state.inventory
    assert state.profiles["main"].equipped == {}
    kinds = sorted(type(p).__name__ for p in pushes(state, change))
    assert kinds == ["InventoryPush", "LoadoutPush"]
