"""What every message type shares: the field types with their limits, the
enums of the catalog, and the base classes of requests and server messages
(``protocol.messages`` and ``protocol.money`` build on them)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from msgspec import Meta, Struct

__all__ = [
    "MAX_GEMS",
    "MAX_QUANTITY",
    "PROTOCOL_VERSION",
    "Delivery",
    "ItemKind",
    "ItemStatus",
    "Reply",
    "Request",
    "Role",
    "ServerMessage",
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


class Request(Struct, tag_field="type", kw_only=True):
    """Base of every request: ``rid`` is echoed in the reply."""

    rid: Rid = None


class ServerMessage(Struct, tag_field="type", kw_only=True):
    """Base of every server message."""


class Reply(ServerMessage, kw_only=True):
    """Base of every reply: carries the request's ``rid``."""

    rid: Rid = None
