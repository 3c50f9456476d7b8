"""Reads for ``loadout verify`` (``server.verify``): the database checked
against itself, one range of entity ids at a time.

The caller runs every read on one connection inside ``snapshot``: one
read-only, repeatable-read transaction, so that a server writing meanwhile
cannot make two reads disagree.  A range is ``(after, upto]`` in the order
of ``users.user_id`` (None: unbounded on that side); ranges follow the state
rows (``entities``), and the other reads take the whole range, so journal
and ledger rows of an id with no state row are read too.  Each read is one
short query; the journal, which may hold millions of records of a single
entity (a popular promo code), is streamed through a cursor.  Nothing here
writes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import NamedTuple

import asyncpg

from persistence.journal import LedgerRow

__all__ = [
    "EntityRow",
    "JournalEntry",
    "LedgerTotal",
    "StrayLedgerRow",
    "entities",
    "journal_entries",
    "ledger_totals",
    "reservation_outcomes",
    "snapshot",
    "stray_ledger",
]


class EntityRow(NamedTuple):
    """A ``users`` row: a user's, or an allowance's (``stock:...``, ``promo:...``)."""

    entity: str
    version: int
    balance: int
    state: bytes


class JournalEntry(NamedTuple):
    """A journal record, with the ledger row of the same version if there is one."""

    entity: str
    version: int
    kind: str
    key: str | None
    change: bytes
    ledger: LedgerRow | None


class LedgerTotal(NamedTuple):
    rows: int
    amount: int


class StrayLedgerRow(NamedTuple):
    """A ledger row with no journal record of its ``seq``."""

    entity: str
    seq: int
    amount: int


@contextlib.asynccontextmanager
async def snapshot(con: asyncpg.Connection) -> AsyncIterator[None]:
    """One consistent, read-only view of the database for every read inside."""
    async with con.transaction(isolation="repeatable_read", readonly=True):
        yield


def _within(column: str, after: str | None, upto: str | None) -> tuple[str, list[str]]:
    """The SQL condition of the range ``(after, upto]`` on ``column``, and its arguments."""
    conditions: list[str] = []
    args: list[str] = []
    if after is not None:
        args.append(after)
        conditions.append(f"{column} > ${len(args)}")
    if upto is not None:
        args.append(upto)
        conditions.append(f"{column} <= ${len(args)}")
    return " AND ".join(conditions) or "true", args


async def entities(con: asyncpg.Connection, after: str | None, limit: int) -> list[EntityRow]:
    """The next ``limit`` state rows after ``after``, in id order (keyset pagination)."""
    where, args = _within("user_id", after, None)
    rows = await con.fetch(
        f"SELECT user_id, version, balance, state FROM users WHERE {where}"
        f" ORDER BY user_id LIMIT ${len(args) + 1}",
        *args,
        limit,
    )
    return [EntityRow(*r) for r in rows]


async def journal_entries(
    con: asyncpg.Connection, after: str | None, upto: str | None, prefetch: int = 2000
) -> AsyncIterator[JournalEntry]:
    """The journal records of the range in (entity, version) order, each with
    its ledger row; streamed, ``prefetch`` rows at a time."""
    where, args = _within("j.user_id", after, upto)
    query = (
        "SELECT j.user_id, j.version, j.kind, j.key, j.change,"
        " l.seq, l.at, l.kind AS ledger_kind, l.amount, l.balance, l.sku, l.quantity,"
        " l.key AS ledger_key"
        " FROM journal j LEFT JOIN ledger l ON l.user_id = j.user_id AND l.seq = j.version"
        f" WHERE {where} ORDER BY j.user_id, j.version"
    )
    async for r in con.cursor(query, *args, prefetch=prefetch):
        ledger = None
        if r["seq"] is not None:
            ledger = LedgerRow(
                r["seq"], r["at"], r["ledger_kind"], r["amount"], r["balance"],
                r["sku"], r["quantity"], r["ledger_key"],
            )  # fmt: skip
        yield JournalEntry(r["user_id"], r["version"], r["kind"], r["key"], r["change"], ledger)


async def ledger_totals(
    con: asyncpg.Connection, after: str | None, upto: str | None
) -> dict[str, LedgerTotal]:
    """How many ledger rows each id of the range has, and the sum of their amounts."""
    where, args = _within("user_id", after, upto)
    rows = await con.fetch(
        f"SELECT user_id, count(*) AS n, sum(amount) AS amount FROM ledger WHERE {where}"
        " GROUP BY user_id",
        *args,
    )
    return {r["user_id"]: LedgerTotal(r["n"], int(r["amount"])) for r in rows}


async def stray_ledger(
    con: asyncpg.Connection, after: str | None, upto: str | None
) -> list[StrayLedgerRow]:
    """Ledger rows of the range whose ``seq`` is no journal version of their id."""
    where, args = _within("l.user_id", after, upto)
    rows = await con.fetch(
        f"SELECT l.user_id, l.seq, l.amount FROM ledger l WHERE {where} AND NOT EXISTS"
        " (SELECT 1 FROM journal j WHERE j.user_id = l.user_id AND j.version = l.seq)"
        " ORDER BY l.user_id, l.seq",
        *args,
    )
    return [StrayLedgerRow(*r) for r in rows]


async def reservation_outcomes(
    con: asyncpg.Connection, reservations: Sequence[tuple[str, int]]
) -> dict[tuple[str, int], str]:
    """How each of these reservations (id, deadline) ended, where an outcome is recorded."""
    rows = await con.fetch(
        "SELECT o.res, o.deadline, o.outcome FROM reservation_outcomes o"
        " JOIN unnest($1::text[], $2::bigint[]) AS w(res, deadline)"
        " ON o.res = w.res AND o.deadline = w.deadline",
        [r for r, _ in reservations],
        [d for _, d in reservations],
    )
    return {(r["res"], r["deadline"]): r["outcome"] for r in rows}
