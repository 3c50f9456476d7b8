"""Message types of PROTOCOL.md, one tagged union per direction.

Every message is a msgspec ``Struct`` whose ``type`` field is its tag.  The
limits on each field (lengths, ranges) live here, in the types, so a request
that decodes is already a request whose values are in range; the decoder
turns anything else into ``bad_request`` once, at the boundary.

New fields get defaults; fields are never retyped.
"""

from __future__ import annotations

from typing import Annotated, Any

from msgspec import Meta, Struct

from protocol.base import (
    MAX_GEMS,
    MAX_QUANTITY,
    PROTOCOL_VERSION,
    Category,
    Cursor,
    Delivery,
    GameCode,
    Gems,
    ItemKind,
    ItemStatus,
    Key,
    PageLimit,
    PositiveGems,
    ProfileName,
    Quantity,
    Reason,
    Reply,
    Request,
    Role,
    Seq,
    ServerMessage,
    Sku,
    Slot,
    UserId,
    WatchList,
)
from protocol.money import (
    CancelOrder,
    Contact,
    ContactView,
    FulfillmentPush,
    OrderCancelled,
    Orders,
    OrdersReply,
    OrderUpdated,
    PaymentApplied,
    Refund,
    Refunded,
    RetryOrder,
    SetContact,
    ShipOrder,
)

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

# --------------------------------------------------------------------------
# Client to server


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
    | SetContact
    | Orders
    | CancelOrder
    | Refund
    | RetryOrder
    | ShipOrder
)

#: Requests that change a user and so go through the user's shard journal.
MUTATIONS = (
    Purchase, Consume, CreateProfile, Equip, Unequip, Grant, RenameProfile, Redeem,
    SetContact, CancelOrder, Refund, RetryOrder, ShipOrder,
)  # fmt: skip
#: Requests only an admin token may make.
ADMIN_REQUESTS = (Grant, Refund, RetryOrder, ShipOrder)
#: Requests that name a user explicitly; a player may not make them.
PRIVILEGED_REQUESTS = (Grant, Inspect, Watch, Unwatch, Refund, RetryOrder, ShipOrder)


# --------------------------------------------------------------------------
# Server to client


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
    contact: ContactView = ContactView()
    debt: int = 0


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
    | Contact
    | OrdersReply
    | OrderCancelled
    | Refunded
    | OrderUpdated
    | PaymentApplied
    | Error
)
Push = InventoryPush | LoadoutPush | CatalogChanged | FulfillmentPush
ServerMessageUnion = Welcome | ServerReply | Push
