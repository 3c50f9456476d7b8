"""Catalog validation of the store extensions (PROTOCOL.md §10): an invalid
file is refused whole, naming the item and field."""

from __future__ import annotations

import pytest

from actors.catalog import Catalog, CatalogFileError, demo_catalog_text, parse_catalog

BASE = demo_catalog_text()
ITEM = '\n[[items]]\nsku = "b.x"\nname = "X"\nkind = "non_consumable"\nprice = 1\n'


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (ITEM + 'bundle = [{ sku = "nope" }]\n', ["b.x", "bundle", "nope"]),
        (ITEM + 'bundle = [{ sku = "br.bundle.starter" }]\n', ["b.x", "bundle"]),
        (ITEM + "bundle = []\n", ["b.x", "bundle"]),
        (ITEM + 'bundle = [{ sku = "br.rifle.dragon", quantity = 2 }]\n', ["b.x", "more than"]),
        (
            '\n[[promos]]\ncode = "Y"\nmax_uses = 1\n'
            'items = [{ sku = "br.hat.crown" }, { sku = "br.hat.crown" }]\n',
            ["Y", "twice"],
        ),
        (ITEM + "bundle_gems = 5\n", ["b.x", "bundle_gems"]),
        (ITEM + 'duration = "7x"\n', ["b.x", "duration"]),
        (ITEM + "stock = 0\n", ["b.x", "stock"]),
        (ITEM + 'limit = { count = 0, per = "1h" }\n', ["b.x", "limit"]),
        (
            '\n[[sales]]\nsku = "nope"\nprice = 1\nstarts_at = 2026-01-01T00:00:00Z\n'
            "ends_at = 2026-02-01T00:00:00Z\n",
            ["sale", "nope"],
        ),
        (
            '\n[[sales]]\nsku = "br.hat.crown"\nprice = 1\nstarts_at = 2026-01-01T00:00:00\n'
            "ends_at = 2026-02-01T00:00:00\n",
            ["starts_at", "time zone"],
        ),
        (
            '\n[[sales]]\nsku = "br.emote.dance"\nprice = 1\nstarts_at = 2026-12-01T00:00:00Z\n'
            "ends_at = 2027-02-01T00:00:00Z\n",
            ["overlaps"],
        ),
        ('\n[[promos]]\ncode = "X"\nmax_uses = 1\nitems = [{ sku = "nope" }]\n', ["X", "nope"]),
        ('\n[[promos]]\ncode = "X"\nmax_uses = 1\n', ["X", "at least"]),
        ('\n[[promos]]\ncode = "WELCOME-2026"\nmax_uses = 1\ngems = 1\n', ["duplicate"]),
    ],
)
def test_invalid_store_fields_are_refused(extra: str, words: list[str]) -> None:
    with pytest.raises(CatalogFileError) as refused:
        parse_catalog(BASE + extra)
    for word in words:
        assert word in str(refused.value)


def test_sale_price_applies_only_inside_its_window() -> None:
    catalog = Catalog.from_document(1, parse_catalog(BASE))
    item = catalog.items["br.emote.dance"]
    start, end = 1_793_491_200_000, 1_798_761_600_000  # 2026-11-01 .. 2027-01-01 UTC
    assert catalog.price_at(item, start - 1) == (120, None)
    assert catalog.price_at(item, start) == (90, end)
    assert catalog.price_at(item, end) == (120, None)
    wire = catalog.wire(item, start)
    assert (wire.price, wire.base_price, wire.sale_ends_at) == (90, 120, end)


def test_stock_left_shows_on_limited_items_only() -> None:
    catalog = Catalog.from_document(1, parse_catalog(BASE))
    assert catalog.wire(catalog.items["br.rifle.founders"], 0).stock_left == 500
    assert catalog.wire(catalog.items["br.rifle.founders"], 0, 7).stock_left == 7
    assert catalog.wire(catalog.items["br.hat.crown"], 0, 7).stock_left is None


def test_a_bundle_duration_applies_to_its_contents() -> None:
    from actors.user import handle, new_user
    from protocol.messages import Purchase

    extra = (
        ITEM + 'bundle = [{ sku = "br.hat.crown" }, { sku = "plat.life.extra", quantity = 2 }]\n'
    )
    catalog = Catalog.from_document(1, parse_catalog(BASE + extra + 'duration = "7d"\n'))
    state, _ = new_user("u", 100, 1_000)
    handle(state, Purchase(key="k", sku="b.x", price=1), catalog, 1_000)
    week = 7 * 86_400_000
    assert {s: h.expires_at for s, h in state.inventory.items()} == {
        "br.hat.crown": 1_000 + week,
        "plat.life.extra": 1_000 + week,
    }
