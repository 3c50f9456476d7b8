"""The journal: group commit of entity changes, acknowledged only once durable.

A shard appends the records of a batch with ``write`` and awaits the returned
future; one flusher task commits everything buffered so far in a single
PostgreSQL transaction, then resolves the futures.  The transaction is one
call of the ``loadout_flush`` function (``persistence.schema``) with a column
array per field: one round trip, bulk inserts through ``unnest``.  (COPY
would need a round trip per table plus BEGIN and COMMIT: eight in all, which
on a busy 2-core machine cost more than the copying saves at these sizes.)  While a
flush is in flight the next one fills, so a busy journal commits big batches
and an idle one commits at once.

Each flush is fenced three times (DESIGN.md, "Three facts about Ray"):

* the shard's epoch must still be the current one in ``shard_epochs``
  (read ``FOR SHARE``, so a new owner taking the epoch waits for a flush in
  flight and every later flush of the old owner fails);
* each entity's partition must still be the shard's in the partition map
  (a move waits for the flush, holding the shard's epoch row; an entity of a
  partition moved away is rejected);
* each entity's row must still have the version this writer read.

What cannot be written as it is belongs to one entity, and only that entity
is left out (*rejected*): a key the entity used before, a reservation that has
ended already, a state row that is not the entity's highest record, a row
another writer moved.  Everyone else in the flush commits.  The future of a
write resolves to the set of entities rejected while it waited; their records
still buffered are dropped too (they were built on the rejected ones), and
``on_lost`` tells the shard to reload them from what is durable (DESIGN.md,
"Exactly once, whatever the history").

A flush that fails as a whole (the database is down, the shard was fenced)
raises ``JournalError`` into every future it held *and* every future still
buffered; ``on_lost`` then names all of their entities.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import asyncpg

__all__ = [
    "EpochFenced",
    "Fenced",
    "Journal",
    "JournalError",
    "JournalRecord",
    "LedgerRow",
    "OrderWrite",
    "UserRow",
]

log = logging.getLogger("loadout.journal")


class JournalError(Exception):
    """A flush did not become durable (or its outcome is unknown)."""


class Fenced(JournalError):
    """Another writer owns this shard or these users now."""


class EpochFenced(Fenced):
    """A newer actor took this shard: this one must never write again."""


class LedgerRow(NamedTuple):
    seq: int
    at: int
    kind: str
    amount: int
    balance: int
    sku: str | None
    quantity: int | None
    key: str | None


class OrderWrite(NamedTuple):
    """What a change does to the ``orders`` outbox: opens an order (``opened``:
    purchase, sku, delivery, quantity, total, email, address as JSON) or moves
    it to ``status`` (with the voucher, tracking as JSON, shop order id)."""

    order: str
    at: int
    status: str
    opened: tuple[str, str, str, int, int, str | None, str | None] | None = None
    voucher: str | None = None
    tracking: str | None = None
    shop_order: str | None = None


class JournalRecord(NamedTuple):
    user_id: str
    version: int
    at: int
    kind: str
    key: str | None
    change: bytes
    ledger: LedgerRow | None
    #: How a reservation of a limited item or promo code ended, written with
    #: this record: (reservation id, its deadline, "sold" or "released").  A
    #: reservation ends once: a second outcome rejects its entity's records.
    outcome: tuple[str, int, str] | None = None
    #: The change's orders, written in the same flush (PROTOCOL.md §12).
    orders: tuple[OrderWrite, ...] = ()


class UserRow(NamedTuple):
    """An entity's state row as of its last record in a flush."""

    version: int
    balance: int
    state: bytes
    #: When the user's next time-limited item expires (ms), if any.
    next_expiry: int | None = None


class _Write:
    """One ``write`` call: its records, its future, and who was rejected meanwhile."""

    __slots__ = ("future", "records", "rejected")

    def __init__(self, records: list[JournalRecord], future: asyncio.Future[frozenset[str]]):
        self.records = records
        self.future = future
        self.rejected: set[str] = set()


class Journal:
    """Group-commit writer for one shard."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        shard: int,
        epoch: int,
        snapshot: Callable[[str], UserRow],
        on_lost: Callable[[set[str]], None],
        *,
        max_records: int = 5000,
        interval: float = 0.0,
        on_fenced: Callable[[], None] = lambda: None,
        partition_of: Callable[[str], int] = lambda entity: 0,
    ) -> None:
        self._on_fenced = on_fenced
        self._partition_of = partition_of
        self._pool = pool
        self._shard = shard
        self._epoch = epoch
        self._snapshot = snapshot
        self._on_lost = on_lost
        self._max_records = max_records
        self._interval = interval
        self._writes: list[_Write] = []
        self._buffered = 0
        self._pending: Counter[str] = Counter()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        #: Set (and replaced) after every flush: ``settled`` waits on it.
        self._flushed: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.fenced = False
        self.flushes = 0
        #: Durations of the last flushes (seconds), for the p99 in the shard's stats.
        self.durations: deque[float] = deque(maxlen=512)
        self.flushed_records = 0
        self.rejections = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="journal")

    async def close(self) -> None:
        """Flush what is buffered, then stop."""
        await self.drain()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def write(self, records: list[JournalRecord]) -> asyncio.Future[frozenset[str]]:
        """Buffer records; the future resolves, when they are durable, to the
        entities rejected meanwhile (usually none): their requests were not
        applied, whatever the shard's memory said."""
        future: asyncio.Future[frozenset[str]] = asyncio.get_running_loop().create_future()
        if self.fenced:
            future.set_exception(Fenced("this shard has a newer owner"))
            return future
        if not records and self._idle.is_set():
            future.set_result(frozenset())  # nothing buffered or in flight: all is durable
            return future
        # With no records of its own the caller still waits for the next flush:
        # what it read may depend on records not yet durable.
        self._writes.append(_Write(records, future))
        self._buffered += len(records)
        for record in records:
            self._pending[record.user_id] += 1
        self._idle.clear()
        self._wake.set()
        return future

    def is_pending(self, user_id: str) -> bool:
        """Has this entity records buffered or in flight?"""
        return user_id in self._pending

    def purge(self, entities: Iterable[str]) -> None:
        """Drop the buffered (not yet flushing) records of these entities: their
        writes resolve with them rejected.  Records already in flight stay."""
        doomed = set(entities)
        for write in self._writes:
            kept = [r for r in write.records if r.user_id not in doomed]
            if len(kept) != len(write.records):
                self._release(r for r in write.records if r.user_id in doomed)
                self._buffered -= len(write.records) - len(kept)
                write.records = kept
            write.rejected |= doomed

    async def settled(self, entities: Iterable[str]) -> None:
        """Wait until none of these entities has records buffered or in flight."""
        wanted = set(entities)
        while any(e in self._pending for e in wanted):
            if self._flushed is None:
                self._flushed = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._flushed)

    async def drain(self) -> None:
        """Wait until everything written so far has been flushed (or failed)."""
        await self._idle.wait()

    def _release(self, records: Iterable[JournalRecord]) -> None:
        for record in records:
            self._pending[record.user_id] -= 1
            if not self._pending[record.user_id]:
                del self._pending[record.user_id]

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            if self._interval and self._buffered < self._max_records:
                await asyncio.sleep(self._interval)
            writes, self._writes, self._buffered = self._writes, [], 0
            self._wake.clear()
            records = [r for w in writes for r in w.records]
            started = time.perf_counter()
            try:
                # Cut and snapshot together, with no await in between: each
                # snapshot is the state after the entity's last record here.
                rows = {user: self._snapshot(user) for user in {r.user_id for r in records}}
                rejected = await self._flush(records, rows) if records else set()
            except Exception as exc:
                self._release(records)
                self._fail(records, writes, exc)
            else:
                self._release(records)
                if rejected:
                    self._reject(rejected)
                for write in writes:
                    if not write.future.done():
                        write.future.set_result(frozenset(write.rejected | rejected))
                self.flushes += 1
                self.durations.append(time.perf_counter() - started)
                self.flushed_records += len(records)
                log.debug(
                    "flushed %d records in %.1f ms",
                    len(records),
                    1e3 * (time.perf_counter() - started),
                )
            if self._flushed is not None:
                self._flushed.set_result(None)
                self._flushed = None
            if not self._writes:
                self._idle.set()

    def _reject(self, rejected: set[str]) -> None:
        """Some entities' records were left out: drop what is buffered of theirs
        (built on them) and have the shard reload them."""
        self.rejections += len(rejected)
        log.error(
            "shard %d: records of %d entities rejected (reloaded from the database): %s",
            self._shard, len(rejected), sorted(rejected)[:10],
        )  # fmt: skip
        self.purge(rejected)
        self._on_lost(rejected)

    def _fail(self, records: list[JournalRecord], writes: list[_Write], exc: Exception) -> None:
        if isinstance(exc, Fenced):
            log.error("shard %d fenced out: %s", self._shard, exc)
            error: JournalError = exc
            if isinstance(exc, EpochFenced) and not self.fenced:
                self.fenced = True
                self._on_fenced()
        else:
            log.error(
                "shard %d journal flush of %d records failed: %r", self._shard, len(records), exc
            )
            error = JournalError(repr(exc))
        # Buffered records were applied on top of the failed ones: fail them too.
        later, self._writes, self._buffered = self._writes, [], 0
        later_records = [r for w in later for r in w.records]
        self._release(later_records)
        for write in writes + later:
            if not write.future.done():
                write.future.set_exception(error)
        self._on_lost({r.user_id for r in records} | {r.user_id for r in later_records})

    async def _flush(self, records: list[JournalRecord], rows: dict[str, UserRow]) -> set[str]:
        """One statement, so one round trip and one transaction; returns the
        entities whose records were left out."""
        unsound = _unsound(records, rows)
        if unsound:
            records = [r for r in records if r.user_id not in unsound]
            rows = {u: row for u, row in rows.items() if u not in unsound}
            if not records:
                return unsound
        base: dict[str, int] = {}
        for record in records:
            base.setdefault(record.user_id, record.version - 1)
        ledger = [(r.user_id, *r.ledger) for r in records if r.ledger is not None]
        outcomes = [(r.user_id, *r.outcome) for r in records if r.outcome is not None]
        opened, moved = _order_rows(records)
        users = list(rows)
        try:
            rejected: list[str] = await self._pool.fetchval(
                _FLUSH,
                self._shard,
                self._epoch,
                *_columns(records, 6),
                *_columns(ledger, 9),
                users,
                [base[u] for u in users],
                [rows[u].version for u in users],
                [rows[u].balance for u in users],
                [rows[u].state for u in users],
                [rows[u].next_expiry for u in users],
                [self._partition_of(u) for u in users],
                *_columns(outcomes, 4),
                *_columns(opened, 10),
                *_columns(moved, 7),
            )
        except asyncpg.PostgresError as exc:
            if exc.sqlstate == "LF001":
                raise EpochFenced(exc.args[0] if exc.args else "epoch replaced") from None
            if exc.sqlstate == "LF002" or isinstance(exc, asyncpg.UniqueViolationError):
                raise Fenced(f"another writer moved these users: {exc}") from None
            raise
        return set(rejected) | unsound


def _unsound(records: list[JournalRecord], rows: dict[str, UserRow]) -> set[str]:
    """Entities whose records in a flush do not follow each other, or whose
    state row is not as of their last record (a state row must never be
    written behind the entity's highest journal version)."""
    last: dict[str, int] = {}
    unsound: set[str] = set()
    for record in records:
        before = last.get(record.user_id)
        if before is not None and record.version != before + 1:
            unsound.add(record.user_id)
        last[record.user_id] = record.version
    unsound.update(u for u, version in last.items() if rows[u].version != version)
    return unsound


def _order_rows(
    records: list[JournalRecord],
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The flush's order rows: orders opened, and each moved order's last
    status (with the latest voucher, tracking and shop order seen), so one
    row per order whatever number of changes moved it."""
    opened: list[tuple[Any, ...]] = []
    moved: dict[str, list[Any]] = {}
    for record in records:
        for write in record.orders:
            if write.opened is not None:
                opened.append((record.user_id, write.order, *write.opened, write.at))
                continue
            row = moved.get(write.order)
            if row is None:
                moved[write.order] = [
                    record.user_id, write.order, write.status, write.voucher,
                    write.tracking, write.shop_order, write.at,
                ]  # fmt: skip
                continue
            row[2] = write.status
            row[3] = write.voucher or row[3]
            row[4] = write.tracking or row[4]
            row[5] = write.shop_order or row[5]
            row[6] = write.at
    return opened, [tuple(row) for row in moved.values()]


_FLUSH = "SELECT loadout_flush(" + ", ".join(f"${i}" for i in range(1, 46)) + ")"


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows to columns (``unnest`` takes one array a column)."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*(row[:width] for row in rows), strict=True)]
