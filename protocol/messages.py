"""Message types of PROTOCOL.md, one tagged union per direction.

Every message is a msgspec ``Struct`` whose ``type`` field is its tag.  The
limits on each field (lengths, ranges) live here, in the types, so a request
that decodes is already a request whose values are in range; the decoder
turns anything else into ``bad_request`` once, at the boundary.

New fields get defaults; fields are never retyped.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from msgspec import Meta, Struct

__all__ = [
    "MAX_GEMS",
    "MAX_QUANTITY",
    "PROTOCOL_VERSION",
    "BundleEntry",
    "Catalog",
    "CatalogChanged",
    "CatalogItem",
    "CatalogReply",
    "Categories",
    "CategoriesReply",
    "CategoryCount",
    "ClientMessage",
    "Consume",
    "Consumed",
    "CreateProfile",
    "Delivery",
    "Equip",
    "Equipped",
    "Error",
    "Grant",
    "Granted",
    "History",
    "HistoryReply",
    "Inspect",
    "InventoryEntry",
    "InventoryPush",
    "ItemKind",
    "ItemStatus",
    "LedgerEntry",
    "LimitView",
    "LoadoutPush",
    "ProfileCreated",
    "ProfileRenamed",
    "ProfileView",
    "Purchase",
    "Purchased",
    "Redeem",
    "Redeemed",
    "RenameProfile",
    "Reply",
    "Role",
    "ServerMessage",
    "State",
    "StateReply",
    "Unequip",
    "Unequipped",
    "Unwatch",
    "Unwatched",
    "Watch",
    "WatchedUser",
    "Watching",
    "Welcome",
]

PROTOCOL_VERSION = 1

#: Largest gem amount anywhere (balances, prices, grants): the largest integer
#: a JavaScript client holds exactly, so no client ever rounds money.
MAX_GEMS = 2**53 - 1
#: Largest quantity in one request.
MAX_QUANTITY = 1_000_000

Rid = Annotated[str, Meta(max_length=64)] | Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None
#: An idempotency key is stored in PostgreSQL ``text``, which cannot hold NUL:
#: a key with one would fail the whole group commit it is flushed in.
Key = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[^\x00]*\Z")]
Sku = Annotated[str, Meta(min_length=1, max_length=64)]
UserId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.\-]{1,64}\Z")]
ProfileName = Annotated[str, Meta(min_length=1, max_length=32)]
GameCode = Annotated[str, Meta(min_length=1, max_length=32)]
Slot = Annotated[str, Meta(min_length=1, max_length=64)]
Category = Annotated[str, Meta(min_length=1, max_length=64)]
Quantity = Annotated[int, Meta(ge=1, le=MAX_QUANTITY)]
Gems = Annotated[int, Meta(ge=0, le=MAX_GEMS)]
PositiveGems = Annotated[int, Meta(ge=1, le=MAX_GEMS)]
PageLimit = Annotated[int, Meta(ge=1, le=200)]
Cursor = Annotated[str, Meta(max_length=256)]
Reason = Annotated[str, Meta(max_length=256)]
Seq = Annotated[int, Meta(ge=1, le=2**63 - 1)]
#: The users of one ``watch`` or ``unwatch`` (PROTOCOL.md §11).
WatchList = Annotated[list[UserId], Meta(min_length=1, max_length=500)]


class Role(StrEnum):
    PLAYER = "player"
    SERVICE = "service"
    ADMIN = "admin"


class ItemKind(StrEnum):
    CONSUMABLE = "consumable"
    NON_CONSUMABLE = "non_consumable"


class Delivery(StrEnum):
    IN_GAME = "in_game"
    EMAIL = "email"
    PHYSICAL = "physical"
    FUNCTIONAL = "functional"


class ItemStatus(StrEnum):
    ACTIVE = "active"
    INACTIVE = "inactive"
    COMING_SOON = "coming_soon"


# --------------------------------------------------------------------------
# Client to server


class Request(Struct, tag_field="type", kw_only=True):
    """Base of every request: ``rid`` is echoed in the reply."""

    rid: Rid = None


class State(Request, tag="state"):
    pass


class Catalog(Request, tag="catalog"):
    game: GameCode | None = None
    category: Category | None = None
    cursor: Cursor | None = None
    limit: PageLimit = 50


class Purchase(Request, tag="purchase"):
    key: Key
    sku: Sku
    price: Gems
    quantity: Quantity = 1


class Consume(Request, tag="consume"):
    key: Key
    sku: Sku
    quantity: Quantity = 1


class CreateProfile(Request, tag="create_profile"):
    profile: ProfileName
    game: GameCode | None = None


class Equip(Request, tag="equip"):
    profile: ProfileName
    slot: Slot
    sku: Sku


class Unequip(Request, tag="unequip"):
    profile: ProfileName
    slot: Slot


class History(Request, tag="history"):
    before: Seq | None = None
    limit: PageLimit = 50


class Grant(Request, tag="grant"):
    user: UserId
    amount: PositiveGems
    key: Key
    reason: Reason = ""


class Inspect(Request, tag="inspect"):
    user: UserId


class Categories(Request, tag="categories"):
    game: GameCode | None = None


class Redeem(Request, tag="redeem"):
    key: Key
    code: Annotated[str, Meta(min_length=1, max_length=64)]


class RenameProfile(Request, tag="rename_profile"):
    key: Key
    profile: ProfileName
    name: ProfileName


class Watch(Request, tag="watch"):
    """A service follows these users' loadouts (PROTOCOL.md §11)."""

    users: WatchList
    inventory: bool = False


class Unwatch(Request, tag="unwatch"):
    users: WatchList


ClientMessage = (
    State
    | Catalog
    | Purchase
    | Consume
    | CreateProfile
    | Equip
    | Unequip
    | History
    | Grant
    | Inspect
    | Categories
    | RenameProfile
    | Redeem
    | Watch
    | Unwatch
)

#: Requests that change a user and so go through the user's shard journal.
MUTATIONS = (Purchase, Consume, CreateProfile, Equip, Unequip, Grant, RenameProfile, Redeem)
#: Requests only an admin token may make.
ADMIN_REQUESTS = (Grant,)
#: Requests that name a user explicitly; a player may not make them.
PRIVILEGED_REQUESTS = (Grant, Inspect, Watch, Unwatch)


# --------------------------------------------------------------------------
# Server to client


class ServerMessage(Struct, tag_field="type", kw_only=True):
    """Base of every server message."""


class Reply(ServerMessage, kw_only=True):
    """Base of every reply: carries the request's ``rid``."""

    rid: Rid = None


class InventoryEntry(Struct):
    sku: str
    quantity: int
    expires_at: int | None = None


class ProfileView(Struct):
    profile: str
    game: str | None
    equipped: dict[str, str]


class BundleEntry(Struct):
    sku: str
    quantity: int


class LimitView(Struct):
    count: int
    per_seconds: int


class CatalogItem(Struct, kw_only=True):
    sku: str
    name: str
    game: str | None
    category: str
    kind: ItemKind
    delivery: Delivery
    price: int
    slot: str | None
    stackable: bool
    max_quantity: int | None
    status: ItemStatus
    metadata: dict[str, Any]
    # Store extensions (PROTOCOL.md §10); ``price`` is always the price now.
    base_price: int = 0
    sale_ends_at: int | None = None
    stock_left: int | None = None
    bundle: list[BundleEntry] | None = None
    bundle_gems: int = 0
    limit: LimitView | None = None
    duration_seconds: int | None = None


class CategoryCount(Struct):
    category: str
    count: int


class LedgerEntry(Struct, kw_only=True):
    seq: int
    at: int
    kind: str
    amount: int
    balance: int
    sku: str | None = None
    quantity: int | None = None
    key: str | None = None


class Welcome(ServerMessage, tag="welcome"):
    user: str
    role: Role
    protocol: int
    server_time: int


class StateReply(Reply, tag="state"):
    user: str
    version: int
    balance: int
    inventory: list[InventoryEntry]
    profiles: list[ProfileView]


class CatalogReply(Reply, tag="catalog"):
    version: int
    items: list[CatalogItem]
    next: str | None


class Purchased(Reply, tag="purchased"):
    purchase: str
    sku: str
    quantity: int
    total: int
    balance: int
    version: int


class Consumed(Reply, tag="consumed"):
    sku: str
    quantity: int
    version: int


class ProfileCreated(Reply, tag="profile_created"):
    profile: str
    game: str | None
    version: int


class Equipped(Reply, tag="equipped"):
    profile: str
    slot: str
    sku: str
    version: int


class Unequipped(Reply, tag="unequipped"):
    profile: str
    slot: str
    version: int


class HistoryReply(Reply, tag="history"):
    entries: list[LedgerEntry]
    next: int | None


class CategoriesReply(Reply, tag="categories"):
    items: list[CategoryCount]


class Redeemed(Reply, tag="redeemed"):
    code: str
    gems: int
    items: list[BundleEntry]
    balance: int
    version: int


class ProfileRenamed(Reply, tag="profile_renamed"):
    profile: str
    version: int


class Granted(Reply, tag="granted"):
    user: str
    balance: int
    version: int


class WatchedUser(Struct, omit_defaults=True):
    """A watched user's snapshot; ``balance`` and ``inventory`` only when asked."""

    user: str
    version: int
    profiles: list[ProfileView]
    balance: int | None = None
    inventory: list[InventoryEntry] | None = None


class Watching(Reply, tag="watching"):
    users: list[WatchedUser]


class Unwatched(Reply, tag="unwatched"):
    users: list[str]


class Error(Reply, tag="error"):
    code: str
    message: str
    retry_after_ms: int | None = None


# ``user`` is set on pushes to watchers (PROTOCOL.md §11) and left out of a
# user's pushes to their own connections, which look as they always did.


class InventoryPush(ServerMessage, tag="inventory", omit_defaults=True):
    version: int
    balance: int
    items: list[InventoryEntry]
    user: str | None = None


class LoadoutPush(ServerMessage, tag="loadout", omit_defaults=True):
    version: int
    profile: str
    game: str | None
    equipped: dict[str, str]
    user: str | None = None


class CatalogChanged(ServerMessage, tag="catalog_changed"):
    version: int


ServerReply = (
    StateReply
    | CatalogReply
    | Purchased
    | Consumed
    | ProfileCreated
    | Equipped
    | Unequipped
    | HistoryReply
    | Granted
    | CategoriesReply
    | ProfileRenamed
    | Redeemed
    | Watching
    | Unwatched
    | Error
)
Push = InventoryPush | LoadoutPush | CatalogChanged
ServerMessageUnion = Welcome | ServerReply | Push
