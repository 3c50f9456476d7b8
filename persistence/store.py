"""Reads and small writes: loading users, replays, history, catalogs, epochs.

Everything here is one short query; the hot write path is ``journal``.
"""

from __future__ import annotations

from typing import NamedTuple

import asyncpg

__all__ = [
    "STATEMENT_TIMEOUT",
    "CatalogRow",
    "acquire_epoch",
    "load_catalog",
    "load_changes_by_key",
    "load_due_expiries",
    "load_ledger",
    "load_retired_items",
    "load_sold",
    "load_users",
    "open_pool",
    "publish_catalog",
]


#: Bounds every statement, a journal flush included (seconds).
STATEMENT_TIMEOUT = 30.0


async def _keep_session(con: asyncpg.Connection) -> None:
    """Loadout keeps no session state (no LISTEN, no session locks or
    settings), so a connection going back to the pool needs no ``RESET ALL``
    round trip; asyncpg still rolls back an open transaction itself."""


async def open_pool(dsn: str, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        reset=_keep_session,
        server_settings={
            # Bounds a journal flush (one statement): see SETTLE_AFTER_MS in actors.saga.
            "statement_timeout": f"{int(STATEMENT_TIMEOUT * 1000)}",
            # The flush function's statements take arrays whose sizes change with
            # every batch, and PostgreSQL kept re-planning all six of them per
            # call (custom plans): about 2 ms of a 3-record flush. Our queries
            # are all keyed lookups and bulk inserts, for which a generic plan is
            # the plan: BENCHMARKS.md, "The journal flush".
            "plan_cache_mode": "force_generic_plan",
        },
    )
    return pool


class StoredUser(NamedTuple):
    version: int
    balance: int
    state: bytes


class CatalogRow(NamedTuple):
    version: int
    document: bytes


async def acquire_epoch(pool: asyncpg.Pool, shard: int) -> int:
    """Take ownership of a shard: every flush of an older epoch fails from now on.

    Waits for a flush of the previous owner that holds the epoch row."""
    epoch: int = await pool.fetchval(
        "INSERT INTO shard_epochs AS s (shard, epoch) VALUES ($1, 1)"
        " ON CONFLICT (shard) DO UPDATE SET epoch = s.epoch + 1 RETURNING epoch",
        shard,
    )
    return epoch


async def load_users(pool: asyncpg.Pool, user_ids: list[str]) -> dict[str, StoredUser]:
    rows = await pool.fetch(
        "SELECT user_id, version, balance, state FROM users WHERE user_id = ANY($1::text[])",
        user_ids,
    )
    return {r["user_id"]: StoredUser(r["version"], r["balance"], r["state"]) for r in rows}


async def load_due_expiries(
    pool: asyncpg.Pool, before: int, limit: int = 100_000
) -> list[tuple[str, int]]:
    """Users whose next time-limited item expires before ``before`` (ms)."""
    rows = await pool.fetch(
        "SELECT user_id, next_expiry FROM users WHERE next_expiry < $1"
        " ORDER BY next_expiry LIMIT $2",
        before,
        limit,
    )
    return [(r["user_id"], r["next_expiry"]) for r in rows]


async def load_changes_by_key(
    pool: asyncpg.Pool, wanted: list[tuple[str, str]]
) -> dict[tuple[str, str], bytes]:
    """The journaled change that used each (user, scoped key), where one did."""
    rows = await pool.fetch(
        "SELECT j.user_id, j.key, j.change FROM journal j"
        " JOIN unnest($1::text[], $2::text[]) AS w(user_id, key)"
        " ON j.user_id = w.user_id AND j.key = w.key",
        [u for u, _ in wanted],
        [k for _, k in wanted],
    )
    return {(r["user_id"], r["key"]): r["change"] for r in rows}


async def load_sold(pool: asyncpg.Pool, reservations: list[str]) -> dict[str, list[int]]:
    """Per reservation id, the deadlines its sales were recorded with."""
    rows = await pool.fetch(
        "SELECT res, deadline FROM reservation_outcomes"
        " WHERE res = ANY($1::text[]) AND outcome = 'sold'",
        reservations,
    )
    sold: dict[str, list[int]] = {}
    for r in rows:
        sold.setdefault(r["res"], []).append(r["deadline"])
    return sold


async def load_ledger(
    pool: asyncpg.Pool, user_id: str, before: int | None, limit: int
) -> list[asyncpg.Record]:
    """Ledger entries of a user, newest first, with seq below ``before``."""
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT seq, at, kind, amount, balance, sku, quantity, key FROM ledger"
        " WHERE user_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3",
        user_id,
        before if before is not None else 2**63 - 1,
        limit,
    )
    return rows


async def load_catalog(pool: asyncpg.Pool) -> CatalogRow | None:
    """The live (newest) catalog document, or None when none was published."""
    row = await pool.fetchrow(
        "SELECT version, document FROM catalog_versions ORDER BY version DESC LIMIT 1"
    )
    return None if row is None else CatalogRow(row["version"], row["document"])


async def load_retired_items(pool: asyncpg.Pool, version: int) -> list[bytes]:
    """Last definitions of skus that catalogs before ``version`` had and it lacks."""
    rows = await pool.fetch(
        "SELECT DISTINCT ON (sku) definition FROM items i WHERE catalog_version < $1"
        " AND NOT EXISTS (SELECT 1 FROM items c WHERE c.catalog_version = $1 AND c.sku = i.sku)"
        " ORDER BY sku, catalog_version DESC",
        version,
    )
    return [r["definition"] for r in rows]


class ItemRow(NamedTuple):
    sku: str
    game: str | None
    category: str
    kind: str
    status: str
    price: int
    definition: bytes


async def publish_catalog(
    pool: asyncpg.Pool,
    source: str,
    document: bytes,
    games: list[tuple[str, str]],
    items: list[ItemRow],
    *,
    only_if_none: bool = False,
) -> int | None:
    """Publish a catalog version atomically; return its number.

    With ``only_if_none``, publish only when no catalog exists (and return
    None otherwise): several gateways starting at once publish the demo once.
    """
    async with pool.acquire() as con, con.transaction():
        await con.execute("LOCK TABLE catalog_versions IN EXCLUSIVE MODE")
        if only_if_none and await con.fetchval("SELECT count(*) FROM catalog_versions"):
            return None
        version: int = await con.fetchval(
            "INSERT INTO catalog_versions (source, document) VALUES ($1, $2) RETURNING version",
            source,
            document,
        )
        await con.copy_records_to_table(
            "games",
            records=[(version, *g) for g in games],
            columns=("catalog_version", "code", "name"),
        )
        await con.copy_records_to_table(
            "items",
            records=[(version, *i) for i in items],
            columns=("catalog_version", *ItemRow._fields),
        )
        return version
