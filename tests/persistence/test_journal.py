"""Tests for persistence.journal: group commit and fencing against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest

from persistence.embedded import EmbeddedPostgres
from persistence.journal import (
    EpochFenced,
    Fenced,
    Journal,
    JournalError,
    JournalRecord,
    LedgerRow,
    UserRow,
)
from persistence.schema import migrate
from persistence.store import acquire_epoch, open_pool

TIMEOUT = 5.0  # no test may hang on a future the journal forgot
_shards = itertools.count(1)


@pytest.fixture(scope="module")
def dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedPostgres(tmp_path_factory.mktemp("journal"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await open_pool(dsn)
    try:
        await migrate(pool)
        yield pool
    finally:
        await pool.close()


class Shard:
    """A journal on a shard of its own, with the hooks a shard actor would give it."""

    def __init__(self, pool: asyncpg.Pool, number: int, epoch: int) -> None:
        self.number = number
        self.rows: dict[str, UserRow] = {}  # the snapshot: a KeyError for unknown users
        self.dropped: list[set[str]] = []
        self.journal = Journal(pool, number, epoch, self.rows.__getitem__, self.dropped.append)

    def user(self, name: str) -> str:
        return f"s{self.number}-{name}"

    def record(self, user: str, version: int, balance: int, amount: int = 0) -> JournalRecord:
        """The record of *user*'s change to *version*, setting the snapshot to its state."""
        self.rows[user] = UserRow(version, balance, f"{user}@{version}".encode())
        ledger = LedgerRow(version, 1000 + version, "grant", amount, balance, None, None, None)
        return JournalRecord(
            user, version, 1000 + version, "grant", None, b"change", ledger if amount else None
        )


@pytest.fixture
async def shard(pool: asyncpg.Pool) -> AsyncIterator[Shard]:
    number = next(_shards)
    shard = Shard(pool, number, await acquire_epoch(pool, number))
    shard.journal.start()
    try:
        yield shard
    finally:
        await asyncio.wait_for(shard.journal.close(), TIMEOUT)


async def settle(future: asyncio.Future[Any]) -> Any:
    return await asyncio.wait_for(future, TIMEOUT)


async def stored(pool: asyncpg.Pool, user: str) -> tuple[list[int], list[tuple[int, ...]], Any]:
    """What is durable of *user*: journal versions, ledger rows, users row."""
    journal = await pool.fetch("SELECT version FROM journal WHERE user_id = $1 ORDER BY 1", user)
    ledger = await pool.fetch(
        "SELECT seq, amount, balance FROM ledger WHERE user_id = $1 ORDER BY seq", user
    )
    row = await pool.fetchrow("SELECT version, balance, state FROM users WHERE user_id = $1", user)
    versions = [r["version"] for r in journal]
    return versions, [tuple(r) for r in ledger], None if row is None else tuple(row)


@contextlib.asynccontextmanager
async def epoch_row_held(pool: asyncpg.Pool, shard: int, *, bump: bool) -> AsyncIterator[None]:
    """Hold the shard's epoch row, so a flush waits on it; with *bump*, a new owner
    takes the epoch when the block ends (as ``acquire_epoch`` does)."""
    async with pool.acquire() as con, con.transaction():
        if bump:
            await con.execute("UPDATE shard_epochs SET epoch = epoch + 1 WHERE shard = $1", shard)
        else:
            await con.execute("SELECT 1 FROM shard_epochs WHERE shard = $1 FOR UPDATE", shard)
        yield


async def flush_waiting(pool: asyncpg.Pool) -> None:
    """Return once a flush is in flight, waiting on a row lock."""
    for _ in range(100):
        if await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND query LIKE 'SELECT loadout_flush%'"
        ):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("no flush waits on the epoch row")


async def test_write_is_durable_in_every_table_and_moves_rows_from_their_version(
    pool: asyncpg.Pool, shard: Shard
) -> None:
    a, b, c = shard.user("a"), shard.user("b"), shard.user("c")
    records = [shard.record(a, 1, 100, 100), shard.record(a, 2, 100), shard.record(b, 1, 50, 50)]
    first = shard.journal.write([*records, shard.record(c, 1, 0)])
    assert not first.done()
    await settle(first)
    assert await stored(pool, a) == ([1, 2], [(1, 100, 100)], (2, 100, b"%s@2" % a.encode()))
    assert await stored(pool, b) == ([1], [(1, 50, 50)], (1, 50, b"%s@1" % b.encode()))
    assert await stored(pool, c) == ([1], [], (1, 0, b"%s@1" % c.encode()))

    await settle(shard.journal.write([shard.record(a, 3, 70, -30), shard.record(b, 2, 50)]))
    assert await stored(pool, a) == (
        [1, 2, 3],
        [(1, 100, 100), (3, -30, 70)],
        (3, 70, b"%s@3" % a.encode()),
    )
    assert await stored(pool, b) == ([1, 2], [(1, 50, 50)], (2, 50, b"%s@2" % b.encode()))
    assert (await stored(pool, c))[2] == (1, 0, b"%s@1" % c.encode())
    assert shard.dropped == []


async def test_writes_issued_together_share_flushes(pool: asyncpg.Pool, shard: Shard) -> None:
    users = [shard.user(f"u{i}") for i in range(30)]
    futures = [shard.journal.write([shard.record(u, 1, 10, 10)]) for u in users]
    await settle(asyncio.gather(*futures))
    assert 1 <= shard.journal.flushes < len(futures)
    assert shard.journal.flushed_records == len(users)
    count = await pool.fetchval("SELECT count(*) FROM users WHERE user_id = ANY($1)", users)
    assert count == len(users)


async def test_empty_write_with_nothing_pending_resolves_at_once(shard: Shard) -> None:
    assert shard.journal.write([]).done()
    await settle(shard.journal.write([shard.record(shard.user("a"), 1, 10, 10)]))
    done = shard.journal.write([])
    assert done.done() and done.result() == frozenset()


@pytest.mark.parametrize("fail", [False, True], ids=["durable", "failed"])
async def test_empty_write_waits_for_the_flush_in_flight(
    pool: asyncpg.Pool, shard: Shard, fail: bool
) -> None:
    a = shard.user("a")
    async with epoch_row_held(pool, shard.number, bump=fail):
        pending = shard.journal.write([shard.record(a, 1, 10, 10)])
        await flush_waiting(pool)
        empty = shard.journal.write([])
        await asyncio.sleep(0.2)
        assert not empty.done()
    if fail:
        for future in (pending, empty):
            with pytest.raises(EpochFenced):
                await settle(future)
        assert await stored(pool, a) == ([], [], None)
    else:
        await settle(empty)
        assert pending.done()
        assert await stored(pool, a) == ([1], [(1, 10, 10)], (1, 10, b"%s@1" % a.encode()))


async def test_a_new_epoch_fences_the_old_journal_for_good(
    pool: asyncpg.Pool, shard: Shard
) -> None:
    a = shard.user("a")
    await settle(shard.journal.write([shard.record(a, 1, 10, 10)]))
    await acquire_epoch(pool, shard.number)
    with pytest.raises(EpochFenced):
        await settle(shard.journal.write([shard.record(a, 2, 30, 20)]))
    assert shard.journal.fenced
    assert shard.dropped == [{a}]
    later = shard.journal.write([shard.record(a, 3, 50, 20)])
    assert later.done()
    with pytest.raises(Fenced):
        later.result()
    assert await stored(pool, a) == ([1], [(1, 10, 10)], (1, 10, b"%s@1" % a.encode()))


@pytest.mark.parametrize(
    "other_writer",
    [
        "UPDATE users SET version = 7 WHERE user_id = $1",
        "INSERT INTO journal VALUES ($1, 2, 0, 'other', NULL, '')",
    ],
    ids=["moved-row", "duplicate-version"],
)
async def test_another_writer_of_a_user_rejects_that_user_only(
    pool: asyncpg.Pool, shard: Shard, other_writer: str
) -> None:
    a, b = shard.user("a"), shard.user("b")
    await settle(shard.journal.write([shard.record(a, 1, 10, 10)]))
    await pool.execute(other_writer, a)
    rejected = await settle(
        shard.journal.write([shard.record(a, 2, 30, 20), shard.record(b, 1, 5, 5)])
    )
    assert rejected == {a}
    assert not shard.journal.fenced
    assert shard.dropped == [{a}]
    assert await stored(pool, b) == ([1], [(1, 5, 5)], (1, 5, b"%s@1" % b.encode()))
    _, ledger, row = await stored(pool, a)
    assert ledger == [(1, 10, 10)] and row[1:] == (10, b"%s@1" % a.encode())


async def test_a_duplicate_key_rejects_its_user_and_nobody_else(
    pool: asyncpg.Pool, shard: Shard
) -> None:
    """Regression (issue exactly-once, 2): a key already in the journal failed
    the whole group commit, unrelated users included."""
    a, b = shard.user("a"), shard.user("b")
    await settle(shard.journal.write([shard.record(a, 1, 10, 10)._replace(key="a:old")]))
    again = shard.record(a, 2, 20, 10)._replace(key="a:old")
    others = [shard.record(b, 1, 5, 5)._replace(key="a:old"), shard.record(b, 2, 6, 1)]
    rejected = await settle(shard.journal.write([again, *others]))
    assert rejected == {a}
    assert (await stored(pool, a))[0] == [1]
    assert (await stored(pool, b))[0] == [1, 2]
    assert shard.journal.rejections == 1


async def test_the_same_key_twice_in_one_flush_rejects_its_user(
    pool: asyncpg.Pool, shard: Shard
) -> None:
    a, b = shard.user("a"), shard.user("b")
    twice = [
        shard.record(a, 1, 1, 1)._replace(key="p:k"),
        shard.record(a, 2, 2, 1)._replace(key="p:k"),
    ]
    rejected = await settle(shard.journal.write([*twice, shard.record(b, 1, 5, 5)]))
    assert rejected == {a}
    assert await stored(pool, a) == ([], [], None)
    assert (await stored(pool, b))[0] == [1]


async def test_a_state_row_behind_its_records_is_refused(pool: asyncpg.Pool, shard: Shard) -> None:
    """Regression (issue exactly-once, 4): a state row whose version is not the
    user's highest record (a user reloaded while its records were buffered)
    was written, and the user's balance lost an acknowledged change."""
    a, b = shard.user("a"), shard.user("b")
    await settle(shard.journal.write([shard.record(a, 1, 10, 10)]))
    record = shard.record(a, 2, 20, 10)
    shard.rows[a] = UserRow(1, 10, b"stale")  # the snapshot of a reloaded user
    rejected = await settle(shard.journal.write([record, shard.record(b, 1, 5, 5)]))
    assert rejected == {a}
    assert await stored(pool, a) == ([1], [(1, 10, 10)], (1, 10, b"%s@1" % a.encode()))
    assert (await stored(pool, b))[0] == [1]


async def test_records_buffered_behind_a_rejected_user_are_dropped_with_it(
    pool: asyncpg.Pool, shard: Shard
) -> None:
    a, b = shard.user("a"), shard.user("b")
    await settle(shard.journal.write([shard.record(a, 1, 10, 10)._replace(key="p:k")]))
    async with epoch_row_held(pool, shard.number, bump=False):
        duplicate = shard.journal.write([shard.record(a, 2, 20, 10)._replace(key="p:k")])
        await flush_waiting(pool)
        behind = shard.journal.write([shard.record(a, 3, 30, 10), shard.record(b, 1, 5, 5)])
        assert shard.journal.is_pending(a)
    assert await settle(duplicate) == {a}
    assert await settle(behind) == {a}
    assert not shard.journal.is_pending(a)
    assert (await stored(pool, a))[0] == [1]
    assert (await stored(pool, b))[0] == [1]


async def test_purge_drops_buffered_records_and_settled_waits_for_the_flight(
    pool: asyncpg.Pool, shard: Shard
) -> None:
    a, b = shard.user("a"), shard.user("b")
    async with epoch_row_held(pool, shard.number, bump=False):
        flying = shard.journal.write([shard.record(a, 1, 10, 10)])
        await flush_waiting(pool)
        buffered = shard.journal.write([shard.record(a, 2, 20, 10), shard.record(b, 1, 5, 5)])
        shard.journal.purge({a})
        assert shard.journal.is_pending(a)  # version 1 is still in flight
        settled = asyncio.ensure_future(shard.journal.settled({a}))
        await asyncio.sleep(0.1)
        assert not settled.done()
    await settle(settled)
    assert await settle(flying) == frozenset()
    assert await settle(buffered) == {a}
    assert (await stored(pool, a))[0] == [1]
    assert (await stored(pool, b))[0] == [1]


async def test_a_failed_flush_fails_everything_buffered_behind_it(
    pool: asyncpg.Pool, shard: Shard
) -> None:
    a, b = shard.user("a"), shard.user("b")
    async with epoch_row_held(pool, shard.number, bump=True):
        first = shard.journal.write([shard.record(a, 1, 10, 10)])
        await flush_waiting(pool)
        behind = [
            shard.journal.write([shard.record(b, 1, 20, 20)]),
            shard.journal.write([shard.record(a, 2, 15, 5)]),
            shard.journal.write([]),
        ]
        assert shard.journal.is_pending(a) and shard.journal.is_pending(b)
    for future in (first, *behind):
        with pytest.raises(EpochFenced):
            await settle(future)
    assert not shard.journal.is_pending(a) and not shard.journal.is_pending(b)
    assert shard.dropped == [{a, b}]
    await asyncio.wait_for(shard.journal.drain(), TIMEOUT)
    assert await stored(pool, a) == ([], [], None)
    assert await stored(pool, b) == ([], [], None)


async def test_a_failing_snapshot_fails_its_flush_and_the_journal_goes_on(
    pool: asyncpg.Pool, shard: Shard
) -> None:
    ghost, a, b = shard.user("ghost"), shard.user("a"), shard.user("b")
    unknown = JournalRecord(ghost, 1, 1001, "grant", None, b"change", None)
    with pytest.raises(JournalError) as raised:
        await settle(shard.journal.write([unknown, shard.record(a, 1, 10, 10)]))
    assert not isinstance(raised.value, Fenced)
    assert shard.dropped == [{ghost, a}]
    assert not shard.journal.fenced and not shard.journal.is_pending(a)
    await settle(shard.journal.write([shard.record(b, 1, 5, 5)]))
    assert await stored(pool, b) == ([1], [(1, 5, 5)], (1, 5, b"%s@1" % b.encode()))
    assert await stored(pool, a) == ([], [], None)
    assert await stored(pool, ghost) == ([], [], None)


async def test_a_reservation_is_sold_or_released_never_both(
    pool: asyncpg.Pool, shard: Shard
) -> None:
    """A reservation ends once: a second outcome rejects its entity's records
    (a purchase stalled in COMMIT cannot outlive a release), and only those."""
    buyer, stock, other = shard.user("buyer"), shard.user("stock"), shard.user("other")
    sold = shard.record(buyer, 1, 10)._replace(outcome=("u/k/f", 5, "sold"))
    await settle(shard.journal.write([sold]))
    released = shard.record(stock, 1, 0)._replace(outcome=("u/k/f", 5, "released"))
    rejected = await settle(shard.journal.write([released, shard.record(other, 1, 1, 1)]))
    assert rejected == {stock}
    assert (await stored(pool, stock))[0] == []
    assert (await stored(pool, other))[0] == [1]
    later = shard.record(stock, 1, 0)._replace(outcome=("u/k/f", 6, "released"))
    assert await settle(shard.journal.write([later])) == frozenset()
    outcomes = await pool.fetch("SELECT deadline, outcome FROM reservation_outcomes WHERE res = $1",
                                "u/k/f")  # fmt: skip
    assert sorted((r["deadline"], r["outcome"]) for r in outcomes) == [(5, "sold"), (6, "released")]
