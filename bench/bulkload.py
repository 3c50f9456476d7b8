"""Registered users in bulk: ``loadout bench users load --count 1000000``.

Writes users straight into Loadout's database with COPY, exactly as the
product would have written them for a user that exists: a new user's first
change is its starting credit (``actors.user.new_user``), so each user gets

* a ``users`` row at version 1 with the balance and the state snapshot the
  shard writes (``UserState.snapshot``, ``next_expiry``),
* the ``journal`` row of that change (``actors.shard.records.record_of``),
* its ``ledger`` row (seq 1, kind ``starting``),

so ``loadout verify`` finds the ledger summing to every balance and the
journal rebuilding every row.  The rows are made by the product's own code
for one user and reused for the others when they do not depend on the id
(they do not: the id is not inside the change or the snapshot), so the loader
spends its time in COPY, not in Python.

Memory is bounded by the chunk: ids are generated, written and dropped one
chunk at a time, each chunk in one transaction (three COPYs), so an
interrupted load leaves whole users only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg

from actors.shard.records import record_of
from actors.user import new_user, next_expiry

__all__ = ["LoadResult", "bulk_load", "rows_of", "user_id"]

#: Users written per transaction (three COPYs).
CHUNK = 20_000

_USERS = ("user_id", "version", "balance", "state", "next_expiry")
_JOURNAL = ("user_id", "version", "at", "kind", "key", "change")
_LEDGER = ("user_id", "seq", "at", "kind", "amount", "balance", "sku", "quantity", "key")


def user_id(prefix: str, index: int) -> str:
    """The id of the ``index``-th loaded user: zero-padded, so ids sort in
    load order and the indexes grow at their right edge."""
    return f"{prefix}{index:07d}"


@dataclass(frozen=True)
class Rows:
    """One user's rows, without the user id in front."""

    user: tuple[Any, ...]
    journal: tuple[Any, ...]
    ledger: tuple[Any, ...]


def rows_of(uid: str, balance: int, at: int) -> Rows:
    """The rows a shard writes for a user whose first change is a starting
    credit of ``balance`` gems at ``at`` (ms): the product's own code."""
    if balance < 1:
        raise ValueError("a registered user has a first change: the balance must be >= 1")
    state, change = new_user(uid, balance, at)
    assert change is not None
    record = record_of(uid, change)
    assert record.ledger is not None
    return Rows(
        (state.version, state.balance, state.snapshot(), next_expiry(state)),
        tuple(record[1:6]),
        tuple(record.ledger),
    )


@dataclass(frozen=True)
class LoadResult:
    users: int
    seconds: float

    @property
    def rows(self) -> int:
        return 3 * self.users

    @property
    def users_per_s(self) -> float:
        return self.users / self.seconds if self.seconds else 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def _template(prefix: str, balance: int, at: int) -> Callable[[str], Rows]:
    """Rows for any id: one user's rows reused, if two ids give the same rows
    (they do today); else each user's own, made by the product's code."""
    first = rows_of(user_id(prefix, 0), balance, at)
    if first == rows_of(user_id(prefix, 1), balance, at):
        return lambda uid: first
    return lambda uid: rows_of(uid, balance, at)


async def bulk_load(
    con: asyncpg.Connection,
    count: int,
    *,
    prefix: str = "m",
    start: int = 0,
    balance: int = 1_000_000,
    chunk: int = CHUNK,
    progress: Callable[[int], None] = lambda done: None,
) -> LoadResult:
    """Write users ``prefix + start .. prefix + start + count - 1``; the
    database must be migrated and must not have them yet (COPY refuses
    duplicates: the chunk's transaction rolls back)."""
    at = time.time_ns() // 1_000_000
    rows = _template(prefix, balance, at)
    started = time.perf_counter()
    # A lost last chunk on a crash is fine for a bulk load; waiting for each
    # commit's WAL flush is not needed.
    await con.execute("SET synchronous_commit = off")
    done = 0
    for low in range(start, start + count, chunk):
        ids = [user_id(prefix, i) for i in range(low, min(low + chunk, start + count))]
        made = [(uid, rows(uid)) for uid in ids]
        async with con.transaction():
            await con.copy_records_to_table("users", records=_with_id(made, "user"), columns=_USERS)
            await con.copy_records_to_table(
                "journal", records=_with_id(made, "journal"), columns=_JOURNAL
            )
            await con.copy_records_to_table(
                "ledger", records=_with_id(made, "ledger"), columns=_LEDGER
            )
        done += len(ids)
        progress(done)
    await con.execute("ANALYZE users, journal, ledger")
    await con.execute("RESET synchronous_commit")
    return LoadResult(done, time.perf_counter() - started)


def _with_id(made: list[tuple[str, Rows]], table: str) -> Iterator[tuple[Any, ...]]:
    for uid, rows in made:
        yield (uid, *getattr(rows, table))
