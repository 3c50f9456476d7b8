"""The store catalog: parsing the TOML file, validating it, and looking items up.

Pure code: no I/O beyond reading the file the caller names.  A catalog file is
validated whole before anything is published; the first problem found is
reported with the item (by sku) and the field it is in (PROTOCOL.md §7).
"""

from __future__ import annotations

import base64
import binascii
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from protocol.messages import (
    MAX_GEMS,
    BundleEntry,
    CatalogItem,
    Delivery,
    ItemKind,
    ItemStatus,
    LimitView,
)

__all__ = [
    "Catalog",
    "CatalogDocument",
    "CatalogFileError",
    "GameSpec",
    "ItemSpec",
    "PromoSpec",
    "demo_catalog_text",
    "parse_catalog",
]

Sku = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+\Z")]
GameCode = Annotated[str, Meta(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.\-]+\Z")]
Name = Annotated[str, Meta(min_length=1, max_length=200)]
Label = Annotated[str, Meta(min_length=1, max_length=64)]
Price = Annotated[int, Meta(ge=0, le=MAX_GEMS)]
Gems = Annotated[int, Meta(ge=0, le=MAX_GEMS)]
MaxQuantity = Annotated[int, Meta(ge=1, le=2**31 - 1)]
Quantity = Annotated[int, Meta(ge=1, le=1_000_000)]
#: "<integer><s|m|h|d>", e.g. "90s", "15m", "1h", "7d" (PROTOCOL.md §10).
Duration = Annotated[str, Meta(pattern=r"^[1-9][0-9]{0,6}[smhd]\Z")]
LimitCount = Annotated[int, Meta(ge=1, le=1000)]

_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(text: str) -> int:
    """Seconds in a catalog duration such as ``"7d"``."""
    return int(text[:-1]) * _SECONDS[text[-1]]


class BundleLine(Struct, forbid_unknown_fields=True):
    sku: Sku
    quantity: Quantity = 1


class PurchaseLimit(Struct, frozen=True, forbid_unknown_fields=True):
    """At most ``count`` purchases of an item per user in any window of ``per``."""

    count: LimitCount
    per: Duration

    @property
    def per_ms(self) -> int:
        return duration_seconds(self.per) * 1000


class PromoSpec(Struct, forbid_unknown_fields=True):
    """A promo code: gems and items, at most ``max_uses`` in total and once
    per user, until ``expires_at``."""

    code: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+\Z")]
    max_uses: Annotated[int, Meta(ge=1, le=2**31 - 1)]
    gems: Gems = 0
    items: list[BundleLine] = []
    expires_at: datetime | None = None

    @property
    def expires_ms(self) -> int | None:
        return None if self.expires_at is None else _ms(self.expires_at)


class Defaults(Struct, frozen=True, forbid_unknown_fields=True):
    limit: PurchaseLimit | None = None


class Sale(Struct, forbid_unknown_fields=True):
    """A price override from ``starts_at`` (inclusive) to ``ends_at`` (exclusive)."""

    sku: Sku
    price: Price
    starts_at: datetime
    ends_at: datetime

    @property
    def window_ms(self) -> tuple[int, int]:
        return _ms(self.starts_at), _ms(self.ends_at)


def _ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


class CatalogFileError(ValueError):
    """An invalid catalog file; the message names the item and field."""


class GameSpec(Struct, forbid_unknown_fields=True):
    code: GameCode
    name: Name


class ItemSpec(Struct, kw_only=True, forbid_unknown_fields=True):
    sku: Sku
    name: Name
    kind: ItemKind
    price: Price
    game: GameCode | None = None
    category: Label = "general"
    delivery: Delivery = Delivery.IN_GAME
    slot: Label | None = None
    stackable: bool = False
    max_quantity: MaxQuantity | None = None
    status: ItemStatus = ItemStatus.ACTIVE
    metadata: dict[str, Any] = {}
    #: A bundle grants these (and ``bundle_gems``) and is never held itself.
    bundle: list[BundleLine] | None = None
    bundle_gems: Gems = 0
    #: Per-user purchase limit; the catalog's ``[defaults]`` one when unset.
    limit: PurchaseLimit | None = None
    #: Granted items expire this long after purchase; buying again extends it.
    duration: Duration | None = None
    #: Limited: never sold more than this many times in total (all users).
    stock: Annotated[int, Meta(ge=1, le=2**31 - 1)] | None = None

    @property
    def hold_cap(self) -> int | None:
        """How many a user may hold: 1 for a non-stackable item."""
        return self.max_quantity if self.stackable else 1

    @property
    def pack_gems(self) -> int:
        """A gem pack's gems (a ``functional`` item with ``metadata.gems``), else 0."""
        if self.delivery is not Delivery.FUNCTIONAL:
            return 0
        gems = self.metadata.get("gems", 0)
        return gems if isinstance(gems, int) and not isinstance(gems, bool) else 0

    @property
    def duration_ms(self) -> int | None:
        return None if self.duration is None else duration_seconds(self.duration) * 1000

    def to_wire(self) -> CatalogItem:
        return CatalogItem(
            sku=self.sku,
            name=self.name,
            game=self.game,
            category=self.category,
            kind=self.kind,
            delivery=self.delivery,
            price=self.price,
            slot=self.slot,
            stackable=self.stackable,
            max_quantity=self.max_quantity,
            status=self.status,
            metadata=self.metadata,
            base_price=self.price,
            bundle=(
                [BundleEntry(line.sku, line.quantity) for line in self.bundle]
                if self.bundle is not None
                else None
            ),
            bundle_gems=self.bundle_gems,
            limit=(
                LimitView(self.limit.count, duration_seconds(self.limit.per))
                if self.limit is not None
                else None
            ),
            duration_seconds=(
                duration_seconds(self.duration) if self.duration is not None else None
            ),
        )


class CatalogDocument(Struct, forbid_unknown_fields=True):
    games: list[GameSpec] = []
    items: list[ItemSpec] = []
    defaults: Defaults = Defaults()
    sales: list[Sale] = []
    promos: list[PromoSpec] = []


_PATH = re.compile(r"\$\.(games|items|sales|promos)\[(\d+)\](?:\.(\w+))?")


def _locate(raw: dict[str, Any], path: str) -> str:
    """Turn a msgspec path like ``$.items[3].price`` into words naming the sku."""
    match = _PATH.search(path)
    if match is None:
        return "catalog"
    table, index, fieldname = match.group(1), int(match.group(2)), match.group(3)
    entries = raw.get(table)
    ident: Any = None
    if isinstance(entries, list) and index < len(entries) and isinstance(entries[index], dict):
        ident = entries[index].get("code" if table in ("games", "promos") else "sku")
    where = f"{table[:-1]} {ident!r}" if isinstance(ident, str) else f"{table[:-1]} #{index + 1}"
    return f"{where}, field {fieldname!r}" if fieldname else where


def _check(doc: CatalogDocument) -> None:
    games: set[str] = set()
    for game in doc.games:
        if game.code in games:
            raise CatalogFileError(f"game {game.code!r}, field 'code': duplicate game code")
        games.add(game.code)
    skus: set[str] = set()
    for item in doc.items:
        where = f"item {item.sku!r}"
        if item.sku in skus:
            raise CatalogFileError(f"{where}, field 'sku': duplicate sku")
        skus.add(item.sku)
        if item.game is not None and item.game not in games:
            raise CatalogFileError(f"{where}, field 'game': no game {item.game!r} in [[games]]")
        if item.kind is ItemKind.CONSUMABLE and item.slot is not None:
            raise CatalogFileError(f"{where}, field 'slot': consumables cannot be equipped")
        if not item.stackable and item.max_quantity not in (None, 1):
            raise CatalogFileError(
                f"{where}, field 'max_quantity': a non-stackable item is held once"
            )
        _check_delivery(item, where)
        try:
            msgspec.json.encode(item.metadata)
        except (TypeError, msgspec.EncodeError):
            raise CatalogFileError(
                f"{where}, field 'metadata': values must be plain data"
            ) from None
    items = {item.sku: item for item in doc.items}
    for item in doc.items:
        if item.bundle is not None:
            _check_bundle(item, items)
        elif item.bundle_gems:
            raise CatalogFileError(f"item {item.sku!r}, field 'bundle_gems': only for a bundle")
    _check_sales(doc, items)
    _check_promos(doc, items)


def _check_delivery(item: ItemSpec, where: str) -> None:
    """A gem pack credits gems and is never held; an item delivered outside
    the game (email, physical) is never held either, so neither has a slot."""
    gems = item.metadata.get("gems")
    if item.delivery is Delivery.FUNCTIONAL and gems is not None:
        if not isinstance(gems, int) or isinstance(gems, bool) or not 1 <= gems <= MAX_GEMS:
            raise CatalogFileError(
                f"{where}, field 'metadata': gems must be a whole number of gems >= 1"
            )
    outside = item.delivery in (Delivery.EMAIL, Delivery.PHYSICAL) or item.pack_gems
    if outside and (item.slot is not None or item.duration is not None):
        raise CatalogFileError(
            f"{where}, field 'delivery': a {item.delivery} item is never held: no slot, no duration"
        )
    if outside and item.bundle is not None:
        raise CatalogFileError(f"{where}, field 'delivery': a bundle is delivered in the game")


def _check_bundle(item: ItemSpec, items: dict[str, ItemSpec]) -> None:
    where = f"item {item.sku!r}, field 'bundle'"
    if not item.bundle:
        raise CatalogFileError(f"{where}: a bundle lists at least one item")
    if item.slot is not None or item.kind is ItemKind.CONSUMABLE:
        raise CatalogFileError(f"{where}: a bundle is never held: no slot, not a consumable")
    seen: set[str] = set()
    for line in item.bundle:
        inner = items.get(line.sku)
        if inner is None:
            raise CatalogFileError(f"{where}: no item {line.sku!r} in this catalog")
        if inner.bundle is not None or inner.stock is not None:
            raise CatalogFileError(f"{where}: {line.sku!r} is itself a bundle or limited")
        if inner.delivery in (Delivery.EMAIL, Delivery.PHYSICAL) or inner.pack_gems:
            raise CatalogFileError(f"{where}: {line.sku!r} is not held, so not bundled")
        if line.sku in seen:
            raise CatalogFileError(f"{where}: {line.sku!r} is listed twice")
        seen.add(line.sku)
        cap = inner.hold_cap
        if cap is not None and line.quantity > cap:
            raise CatalogFileError(
                f"{where}: {line.quantity} of {line.sku!r} is more than a user may hold ({cap})"
            )


def _check_sales(doc: CatalogDocument, items: dict[str, ItemSpec]) -> None:
    windows: dict[str, list[tuple[int, int]]] = {}
    for number, sale in enumerate(doc.sales, start=1):
        where = f"sale #{number} ({sale.sku!r})"
        if sale.sku not in items:
            raise CatalogFileError(f"{where}, field 'sku': no such item in this catalog")
        for name, when in (("starts_at", sale.starts_at), ("ends_at", sale.ends_at)):
            if when.tzinfo is None:
                raise CatalogFileError(f"{where}, field {name!r}: give a time zone, e.g. ...Z")
        start, end = sale.window_ms
        if end <= start:
            raise CatalogFileError(f"{where}, field 'ends_at': must be after starts_at")
        for other_start, other_end in windows.get(sale.sku, []):
            if start < other_end and other_start < end:
                raise CatalogFileError(f"{where}: overlaps another sale of the same item")
        windows.setdefault(sale.sku, []).append((start, end))


def _check_promos(doc: CatalogDocument, items: dict[str, ItemSpec]) -> None:
    codes: set[str] = set()
    for promo in doc.promos:
        where = f"promo {promo.code!r}"
        if promo.code in codes:
            raise CatalogFileError(f"{where}, field 'code': duplicate code")
        codes.add(promo.code)
        if not promo.items and not promo.gems:
            raise CatalogFileError(f"{where}: a promo grants at least one item or some gems")
        if promo.expires_at is not None and promo.expires_at.tzinfo is None:
            raise CatalogFileError(f"{where}, field 'expires_at': give a time zone, e.g. ...Z")
        seen: set[str] = set()
        for line in promo.items:
            inner = items.get(line.sku)
            if inner is None:
                raise CatalogFileError(f"{where}, field 'items': no item {line.sku!r}")
            if inner.bundle is not None or inner.stock is not None:
                raise CatalogFileError(
                    f"{where}, field 'items': {line.sku!r} is a bundle or limited item"
                )
            if line.sku in seen:
                raise CatalogFileError(f"{where}, field 'items': {line.sku!r} is listed twice")
            seen.add(line.sku)
            cap = inner.hold_cap
            if cap is not None and line.quantity > cap:
                raise CatalogFileError(
                    f"{where}, field 'items': {line.quantity} of {line.sku!r} is more than"
                    f" a user may hold ({cap})"
                )


def parse_catalog(text: str) -> CatalogDocument:
    """Parse and validate catalog TOML; raise ``CatalogFileError`` naming the problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogFileError(f"not valid TOML: {exc}") from None
    try:
        doc = msgspec.convert(raw, CatalogDocument)
    except msgspec.ValidationError as exc:
        message = str(exc)
        head, _, path = message.rpartition(" - at `")
        where = _locate(raw, path.rstrip("`")) if head else "catalog"
        raise CatalogFileError(f"{where}: {head or message}") from None
    _check(doc)
    return doc


def demo_catalog_text() -> str:
    """The bundled demo catalog, published when a server starts with none."""
    return resources.files("actors").joinpath("demo_catalog.toml").read_text(encoding="utf-8")


@dataclass
class Catalog:
    """One published catalog version, plus items that earlier versions had.

    Items removed from the catalog stay in inventories (PROTOCOL.md §7), so the
    rules still need their kind and slot: ``retired`` keeps the last known
    definition of every sku that is no longer listed.
    """

    version: int
    games: dict[str, GameSpec]
    items: dict[str, ItemSpec]
    retired: dict[str, ItemSpec] = field(default_factory=dict)
    default_limit: PurchaseLimit | None = None
    sales: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)
    promos: dict[str, PromoSpec] = field(default_factory=dict)
    _sorted: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._sorted = sorted(self.items)

    @classmethod
    def from_document(
        cls, version: int, doc: CatalogDocument, retired: Iterable[ItemSpec] = ()
    ) -> Catalog:
        items = {item.sku: item for item in doc.items}
        gone = {item.sku: item for item in retired if item.sku not in items}
        sales: dict[str, list[tuple[int, int, int]]] = {}
        for sale in doc.sales:
            sales.setdefault(sale.sku, []).append((*sale.window_ms, sale.price))
        return cls(
            version,
            {g.code: g for g in doc.games},
            items,
            gone,
            doc.defaults.limit,
            sales,
            {p.code: p for p in doc.promos},
        )

    @classmethod
    def empty(cls) -> Catalog:
        return cls(0, {}, {})

    def lookup(self, sku: str) -> ItemSpec | None:
        """The current or, failing that, last known definition of a sku."""
        return self.items.get(sku) or self.retired.get(sku)

    def price_at(self, item: ItemSpec, now: int) -> tuple[int, int | None]:
        """The price to pay at ``now`` (ms), and when the sale giving it ends."""
        for start, end, price in self.sales.get(item.sku, ()):
            if start <= now < end:
                return price, end
        return item.price, None

    def limit_for(self, item: ItemSpec) -> PurchaseLimit | None:
        """The item's own purchase limit, else the catalog-wide default."""
        return item.limit if item.limit is not None else self.default_limit

    def wire(self, item: ItemSpec, now: int, stock_left: int | None = None) -> CatalogItem:
        """An item as clients see it at ``now``: ``price`` is what to pay now."""
        out = item.to_wire()
        if item.stock is not None:
            out.stock_left = item.stock if stock_left is None else max(0, stock_left)
        out.price, out.sale_ends_at = self.price_at(item, now)
        limit = self.limit_for(item)
        if limit is not None:
            out.limit = LimitView(limit.count, limit.per_ms // 1000)
        return out

    def categories(self, game: str | None) -> list[tuple[str, int]]:
        """Categories with their item counts (with ``game``: its items and the
        platform-wide ones, as ``catalog`` lists them)."""
        counts: dict[str, int] = {}
        for item in self.items.values():
            if game is None or item.game in (None, game):
                counts[item.category] = counts.get(item.category, 0) + 1
        return sorted(counts.items())

    def page(
        self, game: str | None, category: str | None, cursor: str | None, limit: int
    ) -> tuple[list[ItemSpec], str | None]:
        """Items in sku order after ``cursor``; with ``game``, that game's and
        the platform-wide ones.  Raises ``ValueError`` for a bad cursor."""
        after = decode_cursor(cursor) if cursor else None
        out: list[ItemSpec] = []
        for sku in self._sorted:
            if after is not None and sku <= after:
                continue
            item = self.items[sku]
            if game is not None and item.game not in (None, game):
                continue
            if category is not None and item.category != category:
                continue
            if len(out) == limit:
                return out, encode_cursor(out[-1].sku)
            out.append(item)
        return out, None


def encode_cursor(sku: str) -> str:
    return base64.urlsafe_b64encode(sku.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        sku = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError("cursor is not one this server gave out") from None
    if not sku:
        raise ValueError("cursor is not one this server gave out")
    return sku
