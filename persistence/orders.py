"""The ``orders`` outbox and the webhook log (PROTOCOL.md §12), as the
fulfillment worker, the webhook handlers, the shards' ``orders`` pages and
the operators' commands read them.

An order's *status* is written only by its user's journal flush
(``persistence.journal``); this module writes only the worker's own
columns (attempts, next attempt, voucher, shop order, last error) and the
webhook log.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import asyncpg

__all__ = [
    "DueOrder",
    "claim_due",
    "find_change",
    "keep_shop_order",
    "keep_voucher",
    "list_orders",
    "note_failure",
    "order_by_shop_order",
    "order_owner",
    "orders_report",
    "record_webhook",
    "shop_cancelled",
]


class DueOrder(NamedTuple):
    """An order the worker has claimed, with everything it needs to call out."""

    order: str
    user_id: str
    status: str
    sku: str
    delivery: str
    quantity: int
    email: str | None
    address: dict[str, Any] | None
    voucher: str | None
    shop_order: str | None
    attempts: int
    #: When the order's status last changed (ms): names this round of attempts.
    updated_at: int


async def claim_due(
    pool: asyncpg.Pool, deliveries: Sequence[str], limit: int, lease_seconds: float
) -> list[DueOrder]:
    """Claim up to ``limit`` orders that are due (pending; an email order
    processing, which a crash left between "sending" and "sent"; a cancelled
    order the shop holds and was not told of): each claim counts
    an attempt and hides the order for ``lease_seconds`` (so another worker,
    or this one after a crash, takes it again only once the lease is over).
    ``FOR UPDATE SKIP LOCKED``: workers never wait for each other."""
    rows = await pool.fetch(
        """
        UPDATE orders AS o
           SET attempts = o.attempts + 1,
               next_attempt_at = now() + make_interval(secs => $3)
          FROM (SELECT order_id FROM orders
                 WHERE delivery = ANY ($1::text[]) AND next_attempt_at <= now()
                   AND (status = 'pending'
                        OR (status = 'processing' AND delivery = 'email')
                        OR (status = 'cancelled' AND shop_order IS NOT NULL
                            AND NOT shop_cancelled))
                 ORDER BY next_attempt_at
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED) AS due
         WHERE o.order_id = due.order_id
        RETURNING o.order_id, o.user_id, o.status, o.sku, o.delivery, o.quantity, o.email,
                  o.address, o.voucher, o.shop_order, o.attempts, o.updated_at
        """,
        list(deliveries),
        limit,
        lease_seconds,
    )
    return [
        DueOrder(
            r["order_id"],
            r["user_id"],
            r["status"],
            r["sku"],
            r["delivery"],
            r["quantity"],
            r["email"],
            None if r["address"] is None else json.loads(r["address"]),
            r["voucher"],
            r["shop_order"],
            r["attempts"],
            r["updated_at"],
        )
        for r in rows
    ]


async def keep_voucher(pool: asyncpg.Pool, order: str, code: str) -> str:
    """The order's voucher code: ``code`` unless one was kept before (a
    retry sends the same code)."""
    kept: str = await pool.fetchval(
        "UPDATE orders SET voucher = coalesce(voucher, $2) WHERE order_id = $1 RETURNING voucher",
        order,
        code,
    )
    return kept


async def keep_shop_order(pool: asyncpg.Pool, order: str, shop_order: str) -> None:
    await pool.execute(
        "UPDATE orders SET shop_order = coalesce(shop_order, $2) WHERE order_id = $1",
        order,
        shop_order,
    )


async def note_failure(pool: asyncpg.Pool, order: str, error: str, retry_in: float) -> None:
    """An attempt failed: say why, and when to try again."""
    await pool.execute(
        "UPDATE orders SET last_error = $2, next_attempt_at = now() + make_interval(secs => $3)"
        " WHERE order_id = $1",
        order,
        error[:500],
        retry_in,
    )


async def shop_cancelled(pool: asyncpg.Pool, order: str) -> None:
    """The shop knows the order is cancelled (it said so, or was told)."""
    await pool.execute("UPDATE orders SET shop_cancelled = true WHERE order_id = $1", order)


async def order_owner(pool: asyncpg.Pool, order: str) -> str | None:
    owner: str | None = await pool.fetchval("SELECT user_id FROM orders WHERE order_id = $1", order)
    return owner


async def order_by_shop_order(pool: asyncpg.Pool, shop_order: str) -> tuple[str, str] | None:
    """(our order id, its user) of the shop's order id."""
    row = await pool.fetchrow(
        "SELECT order_id, user_id FROM orders WHERE shop_order = $1", shop_order
    )
    return None if row is None else (row["order_id"], row["user_id"])


async def record_webhook(pool: asyncpg.Pool, source: str, event_id: str, outcome: str) -> bool:
    """Log a delivery once; False when this event id was seen before."""
    done = await pool.fetchval(
        "INSERT INTO webhook_events (source, event_id, outcome) VALUES ($1, $2, $3)"
        " ON CONFLICT DO NOTHING RETURNING true",
        source,
        event_id,
        outcome,
    )
    return bool(done)


_COLUMNS = (
    "order_id, user_id, purchase, sku, delivery, status, attempts, voucher, tracking,"
    " created_at, updated_at, last_error"
)


async def list_orders(
    pool: asyncpg.Pool, user_id: str, before: str | None, limit: int
) -> list[asyncpg.Record]:
    """A user's orders, newest first, after the order ``before`` (a page
    cursor); up to ``limit`` rows."""
    rows: list[asyncpg.Record] = await pool.fetch(
        f"SELECT {_COLUMNS} FROM orders WHERE user_id = $1"
        " AND ($2::text IS NULL OR (created_at, order_id) < (SELECT created_at, order_id"
        "      FROM orders WHERE order_id = $2 AND user_id = $1))"
        " ORDER BY created_at DESC, order_id DESC LIMIT $3",
        user_id,
        before,
        limit,
    )
    return rows


async def orders_report(
    pool: asyncpg.Pool, user_id: str | None, status: str | None, limit: int
) -> list[asyncpg.Record]:
    """Orders for an operator (``loadout orders``), newest first."""
    rows: list[asyncpg.Record] = await pool.fetch(
        f"SELECT {_COLUMNS} FROM orders"
        " WHERE ($1::text IS NULL OR user_id = $1) AND ($2::text IS NULL OR status = $2)"
        " ORDER BY created_at DESC, order_id DESC LIMIT $3",
        user_id,
        status,
        limit,
    )
    return rows


async def find_change(
    pool: asyncpg.Pool, user_id: str, kind: str, match: Callable[[int], bool]
) -> bytes | None:
    """The journal record of the user's change of ``kind`` whose version
    ``match`` picks (newest first); None when none does."""
    async with pool.acquire() as con, con.transaction():
        cursor = con.cursor(
            "SELECT version FROM journal WHERE user_id = $1 AND kind = $2 ORDER BY version DESC",
            user_id,
            kind,
        )
        async for row in cursor:
            if match(row["version"]):
                change: bytes = await con.fetchval(
                    "SELECT change FROM journal WHERE user_id = $1 AND version = $2",
                    user_id,
                    row["version"],
                )
                return change
    return None
