"""The shard's reads for PROTOCOL.md §12: what a refunded purchase did (read
back from the journal before the batch applies) and ``orders`` pages (read
from the outbox once the batch is durable, so a page shows every order the
user was told of)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg
import msgspec

from actors.events import decode_change
from actors.money import PurchaseFacts, purchase_facts
from actors.shard.records import BatchItem, error_reply
from actors.user import purchase_id
from persistence import orders as outbox
from protocol.errors import ErrorCode
from protocol.messages import Reply
from protocol.money import OrderEntry, Orders, OrdersReply, Refund, Tracking

__all__ = ["OrdersQuery", "answer_orders", "load_refund_facts"]

log = logging.getLogger("loadout.shard")


@dataclass
class OrdersQuery:
    """An ``orders`` request waiting for the batch to be durable."""

    request: Orders


async def load_refund_facts(
    pool: asyncpg.Pool, batch: list[BatchItem]
) -> dict[int, PurchaseFacts | None]:
    """For each ``refund`` in the batch (by index), what its purchase did, or
    None when the user made no such purchase."""
    facts: dict[int, PurchaseFacts | None] = {}
    for i, (user_id, request) in enumerate(batch):
        if not isinstance(request, Refund):
            continue
        wanted = request.purchase

        def matches(version: int, user_id: str = user_id, wanted: str = wanted) -> bool:
            return purchase_id(user_id, version) == wanted

        data = await outbox.find_change(pool, user_id, "purchase", matches)
        facts[i] = None if data is None else purchase_facts(decode_change(data))
    return facts


_tracking = msgspec.json.Decoder(Tracking)


async def answer_orders(pool: asyncpg.Pool, user_id: str, request: Orders) -> Reply | bytes:
    """The page, or ``unavailable`` when the outbox cannot be read now (a
    read changes nothing: the client asks again)."""
    try:
        rows = await outbox.list_orders(pool, user_id, request.before, request.limit + 1)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.warning("orders of %s could not be read: %r", user_id, exc)
        return error_reply(request.rid, ErrorCode.UNAVAILABLE, "orders cannot be read now; retry")
    entries = [
        OrderEntry(
            order=r["order_id"],
            purchase=r["purchase"],
            sku=r["sku"],
            delivery=r["delivery"],
            status=r["status"],
            attempts=r["attempts"],
            # The code is kept before the email is sent: shown once it was.
            voucher=r["voucher"] if r["status"] == "completed" else None,
            tracking=None if r["tracking"] is None else _tracking.decode(r["tracking"]),
            created_at=r["created_at"],
            updated_at=r["updated_at"],
        )
        for r in rows[: request.limit]
    ]
    more = len(rows) > request.limit
    return OrdersReply(rid=request.rid, entries=entries, next=entries[-1].order if more else None)
