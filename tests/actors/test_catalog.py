"""actors/catalog.py: parsing and validating catalog files (PROTOCOL.md §7),
paging through a catalog, and looking up retired items."""

from __future__ import annotations

import base64

import pytest

from actors.catalog import (
    Catalog,
    CatalogDocument,
    CatalogFileError,
    ItemSpec,
    demo_catalog_text,
    encode_cursor,
    parse_catalog,
)
from protocol.messages import Delivery, ItemKind, ItemStatus

GAMES = """
[[games]]
code = "br"
name = "Battle Royale"

[[games]]
code = "kart"
name = "Kart Racer"
"""

GOOD_ITEM = """
[[items]]
sku = "br.good"
name = "A valid item listed before the bad one"
game = "br"
kind = "non_consumable"
price = 10
"""


def catalog_file(bad_item: str) -> str:
    """A file with games, one valid item and then ``bad_item``."""
    return GAMES + GOOD_ITEM + "\n[[items]]\n" + bad_item.strip() + "\n"


def item_lines(**fields: str) -> str:
    """TOML lines of an item named ``br.bad``; values are raw TOML."""
    values = {
        "sku": '"br.bad"',
        "name": '"Bad"',
        "game": '"br"',
        "kind": '"non_consumable"',
        "price": "100",
    }
    values.update(fields)
    return "\n".join(f"{key} = {value}" for key, value in values.items() if value)


@pytest.fixture(scope="module")
def demo() -> CatalogDocument:
    return parse_catalog(demo_catalog_text())


# --------------------------------------------------------------- parsing


def test_demo_catalog_parses(demo: CatalogDocument) -> None:
    assert {g.code for g in demo.games} == {"br", "kart"}
    assert len(demo.items) >= 10
    skus = [i.sku for i in demo.items]
    assert len(set(skus)) == len(skus)
    dragon = next(i for i in demo.items if i.sku == "br.rifle.dragon")
    assert dragon.game == "br"
    assert dragon.kind is ItemKind.NON_CONSUMABLE
    assert dragon.delivery is Delivery.IN_GAME
    assert dragon.price == 500
    assert dragon.slot == "weapon_skin"
    assert dragon.metadata == {"rarity": "legendary", "weapon_type": "rifle"}
    assert any(i.game is None for i in demo.items)
    assert any(i.kind is ItemKind.CONSUMABLE for i in demo.items)


def test_omitted_fields_get_their_defaults() -> None:
    doc = parse_catalog('[[items]]\nsku = "plat.x"\nname = "X"\nkind = "consumable"\nprice = 0\n')
    (item,) = doc.items
    assert item.game is None
    assert item.category == "general"
    assert item.delivery is Delivery.IN_GAME
    assert item.slot is None
    assert item.stackable is False
    assert item.max_quantity is None
    assert item.status is ItemStatus.ACTIVE
    assert item.metadata == {}


def test_to_wire_carries_every_field(demo: CatalogDocument) -> None:
    dragon = next(i for i in demo.items if i.sku == "br.rifle.dragon")
    wire = dragon.to_wire()
    assert wire.sku == dragon.sku
    assert wire.game == "br"
    assert wire.category == "weapon_skins"
    assert wire.max_quantity == 1
    assert wire.status is ItemStatus.ACTIVE
    assert wire.metadata == dragon.metadata


INVALID_ITEMS: dict[str, tuple[str, list[str]]] = {
    "price-type": (item_lines(price='"500"'), ["'br.bad'", "'price'"]),
    "price-float": (item_lines(price="5.0"), ["'br.bad'", "'price'"]),
    "price-negative": (item_lines(price="-1"), ["'br.bad'", "'price'"]),
    "price-missing": (item_lines(price=""), ["'br.bad'", "price"]),
    "kind-unknown": (item_lines(kind='"skin"'), ["'br.bad'", "'kind'"]),
    "delivery-unknown": (item_lines(delivery='"pigeon"'), ["'br.bad'", "'delivery'"]),
    "status-unknown": (item_lines(status='"retired"'), ["'br.bad'", "'status'"]),
    "field-unknown": (item_lines(colour='"red"'), ["'br.bad'", "colour"]),
    "duplicate-sku": (item_lines(sku='"br.good"'), ["'br.good'", "'sku'", "duplicate"]),
    "game-not-declared": (item_lines(game='"fps"'), ["'br.bad'", "'game'", "fps"]),
    "consumable-with-slot": (
        item_lines(kind='"consumable"', slot='"hat"'),
        ["'br.bad'", "'slot'"],
    ),
    "non-stackable-max-3": (item_lines(max_quantity="3"), ["'br.bad'", "'max_quantity'"]),
    "max-quantity-zero": (
        item_lines(stackable="true", max_quantity="0"),
        ["'br.bad'", "'max_quantity'"],
    ),
    "sku-too-long": (item_lines(sku='"' + "s" * 65 + '"'), ["'sku'"]),
    "sku-bad-characters": (item_lines(sku='"br bad"'), ["'sku'"]),
}


@pytest.mark.parametrize(
    ("bad_item", "fragments"), INVALID_ITEMS.values(), ids=INVALID_ITEMS.keys()
)
def test_invalid_file_is_refused_naming_item_and_field(bad_item: str, fragments: list[str]) -> None:
    with pytest.raises(CatalogFileError) as info:
        parse_catalog(catalog_file(bad_item))
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "br.good" not in message or "duplicate" in message


def test_invalid_toml_is_refused() -> None:
    with pytest.raises(CatalogFileError, match="not valid TOML"):
        parse_catalog(GAMES + '[[items]]\nsku = "br.x\nprice = 1\n')


def test_unknown_top_level_table_is_refused() -> None:
    with pytest.raises(CatalogFileError, match="surprise"):
        parse_catalog(GAMES + "[surprise]\nx = 1\n")


def test_duplicate_game_is_refused() -> None:
    with pytest.raises(CatalogFileError, match=r"game 'br', field 'code'"):
        parse_catalog(GAMES + '[[games]]\ncode = "br"\nname = "Again"\n')


def test_bad_game_entry_names_the_game_and_field() -> None:
    with pytest.raises(CatalogFileError, match=r"game 'fps', field 'name'"):
        parse_catalog('[[games]]\ncode = "fps"\nname = 5\n')


def test_non_stackable_with_max_quantity_one_is_fine() -> None:
    doc = parse_catalog(catalog_file(item_lines(max_quantity="1")))
    assert [i.sku for i in doc.items] == ["br.good", "br.bad"]


def test_sku_with_trailing_newline_is_refused() -> None:
    with pytest.raises(CatalogFileError, match="'sku'"):
        parse_catalog(catalog_file(item_lines(sku='"br.bad\\n"')))


# --------------------------------------------------------------- paging


@pytest.fixture(scope="module")
def catalog(demo: CatalogDocument) -> Catalog:
    return Catalog.from_document(3, demo)


def all_pages(
    catalog: Catalog, game: str | None, category: str | None, limit: int
) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        items, cursor = catalog.page(game, category, cursor, limit)
        assert len(items) <= limit
        pages.append([i.sku for i in items])
        if cursor is None:
            return pages
        assert len(pages) < 1000, "paging does not end"


def test_first_page_lists_everything_in_sku_order(catalog: Catalog, demo: CatalogDocument) -> None:
    items, cursor = catalog.page(None, None, None, 200)
    assert [i.sku for i in items] == sorted(i.sku for i in demo.items)
    assert cursor is None


def test_a_page_exactly_full_has_no_next(catalog: Catalog) -> None:
    items, cursor = catalog.page(None, None, None, len(catalog.items))
    assert len(items) == len(catalog.items)
    assert cursor is None


def test_game_filter_includes_platform_wide_items(catalog: Catalog, demo: CatalogDocument) -> None:
    items, _ = catalog.page("br", None, None, 200)
    assert {i.sku for i in items} == {i.sku for i in demo.items if i.game in ("br", None)}
    assert {i.game for i in items} == {"br", None}
    assert not any(i.game == "kart" for i in items)


def test_unknown_game_lists_only_platform_wide_items(catalog: Catalog) -> None:
    items, _ = catalog.page("nope", None, None, 200)
    assert items
    assert all(i.game is None for i in items)


def test_category_filter(catalog: Catalog, demo: CatalogDocument) -> None:
    items, _ = catalog.page(None, "weapon_skins", None, 200)
    expected = sorted(i.sku for i in demo.items if i.category == "weapon_skins")
    assert [i.sku for i in items] == expected
    assert len(expected) >= 2


def test_game_and_category_filters_combine(catalog: Catalog, demo: CatalogDocument) -> None:
    items, _ = catalog.page("kart", "weapon_skins", None, 200)
    assert {i.sku for i in items} == {
        i.sku for i in demo.items if i.category == "weapon_skins" and i.game in ("kart", None)
    }


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 200])
@pytest.mark.parametrize(
    ("game", "category"),
    [(None, None), ("br", None), ("kart", None), (None, "weapon_skins"), ("br", "hats")],
)
def test_cursor_paging_visits_every_item_once_in_sku_order(
    catalog: Catalog, demo: CatalogDocument, game: str | None, category: str | None, limit: int
) -> None:
    pages = all_pages(catalog, game, category, limit)
    visited = [sku for page in pages for sku in page]
    expected = sorted(
        i.sku
        for i in demo.items
        if (game is None or i.game in (game, None)) and (category is None or i.category == category)
    )
    assert visited == expected
    assert all(len(page) == limit for page in pages[:-1])
    assert pages[-1] or len(pages) == 1


def test_cursor_survives_removal_of_the_item_it_points_at(demo: CatalogDocument) -> None:
    before = Catalog.from_document(1, demo)
    first, cursor = before.page(None, None, None, 2)
    assert cursor is not None
    gone = first[-1].sku
    after = Catalog.from_document(
        2, CatalogDocument(demo.games, [i for i in demo.items if i.sku != gone])
    )
    rest, next_cursor = after.page(None, None, cursor, 200)
    assert [i.sku for i in rest] == sorted(i.sku for i in demo.items)[2:]
    assert next_cursor is None


@pytest.mark.parametrize(
    "cursor",
    [
        "!!!",
        "A",
        "a b",
        "YnI.",
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        "====",
    ],
)
def test_bad_cursors_raise_value_error(catalog: Catalog, cursor: str) -> None:
    with pytest.raises(ValueError):
        catalog.page(None, None, cursor, 10)


def test_cursor_is_opaque_url_safe_text() -> None:
    cursor = encode_cursor("br.rifle.dragon")
    assert "=" not in cursor
    assert "br.rifle" not in cursor


# --------------------------------------------------------------- lookup


def spec(sku: str, kind: ItemKind = ItemKind.NON_CONSUMABLE, slot: str | None = None) -> ItemSpec:
    return ItemSpec(sku=sku, name=sku, kind=kind, price=1, slot=slot)


def test_lookup_finds_retired_items_that_items_does_not_list(demo: CatalogDocument) -> None:
    old = spec("plat.old.hat", slot="hat")
    catalog = Catalog.from_document(5, demo, retired=[old])
    assert "plat.old.hat" not in catalog.items
    assert catalog.lookup("plat.old.hat") == old
    items, _ = catalog.page(None, None, None, 200)
    assert "plat.old.hat" not in {i.sku for i in items}


def test_lookup_prefers_the_current_definition(demo: CatalogDocument) -> None:
    stale = spec("br.rifle.dragon", kind=ItemKind.CONSUMABLE)
    catalog = Catalog.from_document(5, demo, retired=[stale])
    current = catalog.lookup("br.rifle.dragon")
    assert current is not None
    assert current.kind is ItemKind.NON_CONSUMABLE
    assert "br.rifle.dragon" not in catalog.retired


def test_lookup_of_an_unknown_sku_is_none(catalog: Catalog) -> None:
    assert catalog.lookup("no.such.sku") is None


def test_empty_catalog() -> None:
    empty = Catalog.empty()
    assert empty.version == 0
    assert empty.page(None, None, None, 50) == ([], None)
    assert empty.lookup("br.rifle.dragon") is None
