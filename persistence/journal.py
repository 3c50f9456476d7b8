"""The journal: group commit of user changes, acknowledged only once durable.

A shard appends the records of a batch with ``write`` and awaits the returned
future; one flusher task commits everything buffered so far in a single
PostgreSQL transaction, then resolves the futures.  The transaction is one
call of the ``loadout_flush`` function (schema migration 2) with a column
array per field: one round trip, bulk inserts through ``unnest``.  (COPY
would need a round trip per table plus BEGIN and COMMIT: eight in all, which
on a busy 2-core machine cost more than the copying saves at these sizes.)  While a
flush is in flight the next one fills, so a busy journal commits big batches
and an idle one commits at once.

Each flush is fenced twice (DESIGN.md, "Three facts about Ray"):

* the shard's epoch must still be the current one in ``shard_epochs``
  (read ``FOR SHARE``, so a new owner taking the epoch waits for a flush in
  flight and every later flush of the old owner fails);
* each user's row must still have the version this writer read, and each
  ``(user, version)`` journal row must be new.

A failed flush raises ``JournalError`` into every future it held *and* every
future still buffered (their changes were built on the failed ones); the shard
then drops those users, who reload from what is durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import asyncpg

__all__ = [
    "EpochFenced",
    "Fenced",
    "Journal",
    "JournalError",
    "JournalRecord",
    "LedgerRow",
    "UserRow",
]

log = logging.getLogger("loadout.journal")


class JournalError(Exception):
    """A flush did not become durable (or its outcome is unknown)."""


class Fenced(JournalError):
    """Another writer owns this shard or these users now."""


class LedgerRow(NamedTuple):
    seq: int
    at: int
    kind: str
    amount: int
    balance: int
    sku: str | None
    quantity: int | None
    key: str | None


class JournalRecord(NamedTuple):
    user_id: str
    version: int
    at: int
    kind: str
    key: str | None
    change: bytes
    ledger: LedgerRow | None
    #: How a reservation of a limited item or promo code ended, written with
    #: this record: (reservation id, its deadline, "sold" or "released").  Both
    #: cannot commit for one reservation: the second fails the whole flush.
    outcome: tuple[str, int, str] | None = None


class EpochFenced(Fenced):
    """A newer actor took this shard: this one must never write again."""


class UserRow(NamedTuple):
    """A user's state row as of the last record of a flush."""

    version: int
    balance: int
    state: bytes
    #: When the user's next time-limited item expires (ms), if any.
    next_expiry: int | None = None


class Journal:
    """Group-commit writer for one shard."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        shard: int,
        epoch: int,
        snapshot: Callable[[str], UserRow],
        on_failure: Callable[[set[str]], None],
        *,
        max_records: int = 5000,
        interval: float = 0.0,
    ) -> None:
        self._pool = pool
        self._shard = shard
        self._epoch = epoch
        self._snapshot = snapshot
        self._on_failure = on_failure
        self._max_records = max_records
        self._interval = interval
        self._records: list[JournalRecord] = []
        self._futures: list[asyncio.Future[None]] = []
        self._pending: Counter[str] = Counter()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self.fenced = False
        self.flushes = 0
        self.flushed_records = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="journal")

    async def close(self) -> None:
        """Flush what is buffered, then stop."""
        await self.drain()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def write(self, records: list[JournalRecord]) -> asyncio.Future[None]:
        """Buffer records; the future resolves when they are durable."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.fenced:
            future.set_exception(Fenced("this shard has a newer owner"))
            return future
        if not records and self._idle.is_set():
            future.set_result(None)  # nothing buffered or in flight: all is durable
            return future
        # With no records of its own the caller still waits for the next flush:
        # what it read may depend on records not yet durable.
        self._records.extend(records)
        self._futures.append(future)
        for record in records:
            self._pending[record.user_id] += 1
        self._idle.clear()
        self._wake.set()
        return future

    def is_pending(self, user_id: str) -> bool:
        return user_id in self._pending

    async def drain(self) -> None:
        """Wait until everything written so far has been flushed (or failed)."""
        await self._idle.wait()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            if self._interval and len(self._records) < self._max_records:
                await asyncio.sleep(self._interval)
            records, futures = self._records, self._futures
            self._records, self._futures = [], []
            self._wake.clear()
            users = {r.user_id for r in records}
            started = time.perf_counter()
            try:
                # Cut and snapshot together, with no await in between: each
                # snapshot is the state after the user's last record here.
                rows = {user: self._snapshot(user) for user in users}
                if records:
                    await self._flush(records, rows)
            except Exception as exc:
                failed = self._fail(records, futures, exc)
                self._on_failure(failed)
            else:
                for future in futures:
                    if not future.done():
                        future.set_result(None)
                self.flushes += 1
                self.flushed_records += len(records)
                log.debug(
                    "flushed %d records in %.1f ms",
                    len(records),
                    1e3 * (time.perf_counter() - started),
                )
            finally:
                for record in records:
                    self._pending[record.user_id] -= 1
                    if not self._pending[record.user_id]:
                        del self._pending[record.user_id]
            if not self._records and not self._futures:
                self._idle.set()

    def _fail(
        self, records: list[JournalRecord], futures: list[asyncio.Future[None]], exc: Exception
    ) -> set[str]:
        if isinstance(exc, Fenced):
            self.fenced = isinstance(exc, EpochFenced)
            log.error("shard %d fenced out: %s", self._shard, exc)
            error: JournalError = exc
        else:
            log.error(
                "shard %d journal flush of %d records failed: %r", self._shard, len(records), exc
            )
            error = JournalError(repr(exc))
        # Buffered records were applied on top of the failed ones: fail them too.
        later, self._records = self._records, []
        later_futures, self._futures = self._futures, []
        for record in later:
            self._pending[record.user_id] -= 1
            if not self._pending[record.user_id]:
                del self._pending[record.user_id]
        for future in futures + later_futures:
            if not future.done():
                future.set_exception(error)
        return {r.user_id for r in records} | {r.user_id for r in later}

    async def _flush(self, records: list[JournalRecord], rows: dict[str, UserRow]) -> None:
        """One statement, so one round trip and one transaction (migration 2)."""
        base: dict[str, int] = {}
        for record in records:
            base.setdefault(record.user_id, record.version - 1)
        ledger = [(r.user_id, *r.ledger) for r in records if r.ledger is not None]
        outcomes = [r.outcome for r in records if r.outcome is not None]
        users = list(rows)
        try:
            await self._pool.execute(
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
                *_columns(outcomes, 3),
            )
        except asyncpg.PostgresError as exc:
            if exc.sqlstate == "LF001":
                raise EpochFenced(exc.args[0] if exc.args else "epoch replaced") from None
            if exc.sqlstate == "LF002" or isinstance(exc, asyncpg.UniqueViolationError):
                raise Fenced(f"another writer moved these users: {exc}") from None
            raise


_FLUSH = "SELECT loadout_flush(" + ", ".join(f"${i}" for i in range(1, 27)) + ")"


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows to columns (``unnest`` takes one array a column)."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*(row[:width] for row in rows), strict=True)]
