"""The shard host: many user entities in one process, and their journal.

``ShardHost`` is the asyncio adapter around the pure rules in ``actors.user``:
it activates users from PostgreSQL on first use, applies a batch of requests
in order with no ``await`` between reading and writing a user, journals the
changes, answers only once they are durable, publishes pushes to Redis, and
passivates idle users.  ``actors.shard`` wraps it in a Ray actor; tests can
drive it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as aioredis

from actors.allowance import AllowanceState
from actors.catalog import Catalog
from actors.catalog_source import load_live_catalog
from actors.events import Change, decode_change, encode_change
from actors.routing import (
    STOCK_LEFT_KEY,
    catalog_channel,
    shard_index,
    stock_channel,
    user_channel,
)
from actors.saga import (
    AllowanceCaller,
    AllowanceOp,
    HostedAllowance,
    SagaMixin,
    allowance_decoder,
    allowance_encoder,
)
from actors.user import (
    Mutation,
    Outcome,
    UserState,
    expire_due,
    handle,
    new_user,
    next_expiry,
    scoped_key,
)
from actors.user import pushes as user_pushes
from persistence import store
from persistence.journal import Journal, JournalError, JournalRecord, LedgerRow, UserRow
from persistence.publisher import PushPublisher
from protocol.errors import ErrorCode, RequestError
from protocol.messages import (
    Error,
    History,
    HistoryReply,
    Inspect,
    LedgerEntry,
    Reply,
    ServerMessage,
    State,
)

__all__ = [
    "STOCK_LEFT_KEY",
    "AllowanceOp",
    "BatchItem",
    "ShardHost",
    "ShardRequest",
    "ShardSettings",
    "catalog_channel",
    "shard_index",
    "stock_channel",
    "user_channel",
]

log = logging.getLogger("loadout.shard")

#: Requests a shard serves: mutations, and reads that need the user's state.
ShardRequest = Mutation | State | Inspect | History
#: One batch item: the user it acts for and the request.
BatchItem = tuple[str, ShardRequest]


@dataclass(frozen=True)
class ShardSettings:
    shard: int
    database_url: str
    redis_url: str
    starting_balance: int = 0
    idle_seconds: float = 600.0
    max_users: int = 200_000
    flush_interval: float = 0.0
    pool_size: int = 4
    push_queue: int = 10_000
    shards: int = 1


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class ShardHost(SagaMixin):
    def __init__(self, settings: ShardSettings, call: AllowanceCaller | None = None) -> None:
        self.settings = settings
        self.users: OrderedDict[str, UserState] = OrderedDict()
        #: Stock of limited items and uses of promo codes hosted here.
        self.allowances: dict[str, HostedAllowance] = {}
        self._call: AllowanceCaller = call or self._call_self
        self.catalog = Catalog.empty()
        self._loading: dict[str, asyncio.Future[None]] = {}
        self._last_used: dict[str, float] = {}
        #: (expires_at ms, user): when a resident or passivated user's next
        #: time-limited item is due.  Stale entries are harmless.
        self._expiries: list[tuple[int, str]] = []
        self._expiry_wake = asyncio.Event()
        self._next_due: dict[str, int] = {}
        self._pool: asyncpg.Pool | None = None
        self._redis: aioredis.Redis | None = None
        self._journal: Journal | None = None
        self._pushes: PushPublisher | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._encoder = msgspec.msgpack.Encoder()
        self.epoch = 0
        self.activations = 0
        self.passivations = 0

    # ------------------------------------------------------------------ life

    async def start(self) -> None:
        s = self.settings
        self._pool = await store.open_pool(s.database_url, max_size=s.pool_size)
        self._redis = aioredis.from_url(s.redis_url)
        self.epoch = await store.acquire_epoch(self._pool, s.shard)
        self.catalog = await load_live_catalog(self._pool)
        self._journal = Journal(
            self._pool,
            s.shard,
            self.epoch,
            self._snapshot,
            self._drop_users,
            interval=s.flush_interval,
        )
        self._journal.start()
        self._pushes = PushPublisher(self._redis, s.push_queue)
        await self._pushes.start()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._passivate_idle(), name="passivation"),
            loop.create_task(self._expire_on_time(), name="expiry"),
            loop.create_task(self._load_due_expiries(), name="due-expiries"),
            loop.create_task(self._settle_left_behind(), name="settle"),
        ]
        log.info(
            "shard %d started with epoch %d, catalog v%d", s.shard, self.epoch, self.catalog.version
        )
        self._background(self._announce_all_stock())

    async def close(self) -> None:
        """Flush the journal and the pushes, then release connections."""
        if self._journal is not None:
            await self._journal.close()
        if self._pushes is not None:
            await self._pushes.close()
        tasks = list(self._tasks)  # background tasks remove themselves when done
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._redis is not None:
            await self._redis.aclose()
        if self._pool is not None:
            await self._pool.close()
        log.info("shard %d closed", self.settings.shard)

    def stats(self) -> dict[str, Any]:
        journal = self._journal
        return {
            "shard": self.settings.shard,
            "epoch": self.epoch,
            "users": len(self.users),
            "activations": self.activations,
            "passivations": self.passivations,
            "catalog": self.catalog.version,
            "flushes": journal.flushes if journal else 0,
            "flushed_records": journal.flushed_records if journal else 0,
            "fenced": journal.fenced if journal else False,
            "dropped_pushes": self._pushes.dropped if self._pushes else 0,
        }

    # ----------------------------------------------------------------- batch

    async def _reload_catalog(self) -> None:
        assert self._pool is not None
        catalog = await load_live_catalog(self._pool)
        if catalog.version > self.catalog.version:  # two reloads may finish out of order
            self.catalog = catalog
            self._background(self._announce_all_stock())

    async def apply_batch(self, catalog_version: int, batch: list[BatchItem]) -> list[bytes]:
        """Apply a batch in order; reply (msgpack, one per item) once durable."""
        assert self._journal is not None and self._pool is not None
        if self._journal.fenced:
            return [
                self._error(r.rid, ErrorCode.UNAVAILABLE, "shard moved; retry") for _, r in batch
            ]
        if catalog_version > self.catalog.version:
            await self._reload_catalog()
        await self._activate({user for user, _ in batch})
        await self._load_keys(batch)
        now = _now_ms()
        reserved = await self._reserve(batch, now)
        replies: list[bytes | Reply | _HistoryPage] = []
        records: list[JournalRecord] = []
        pushes: list[tuple[str, bytes]] = []
        settle: list[AllowanceOp] = []
        for i, (user_id, request) in enumerate(batch):
            op = reserved.get(i)
            if op is None:
                replies.append(self._apply_one(user_id, request, now, records, pushes))
            elif isinstance(op, str):  # the allowance's shard did not answer
                replies.append(self._error(request.rid, ErrorCode.UNAVAILABLE, "please retry"))
            elif op[0] == "reserve" and _now_ms() >= op[4]:
                # Too late to use the reservation (the deadline the sweeper relies on).
                replies.append(self._error(request.rid, ErrorCode.UNAVAILABLE, "please retry"))
                if self._surely_not_applied(user_id, request):
                    settle.append(("release", *op[1:]))
            else:
                granted = op[0] == "reserve"
                before = len(records)
                reply = self._apply_one(user_id, request, now, records, pushes, granted)
                replies.append(reply)
                if granted:
                    if not isinstance(reply, bytes):
                        if len(records) > before:  # the purchase (not a replay): sold
                            records[-1] = records[-1]._replace(outcome=(op[2], op[4], "sold"))
                        settle.append(("confirm", *op[1:]))
                    elif self._surely_not_applied(user_id, request):
                        settle.append(("release", *op[1:]))
                    # else: the sweeper settles it from the journal.
        try:
            await self._journal_and_push(records, pushes)
        except JournalError as exc:
            message = "the change could not be made durable; nothing was applied; retry"
            log.warning("batch of %d failed: %s", len(batch), exc)
            # Reservations stay: whether the purchase committed is not known,
            # so the sweeper settles them from the journal later.
            return [self._error(r.rid, ErrorCode.UNAVAILABLE, message) for _, r in batch]
        if settle:
            self._background(self._settle(settle))
        out: list[bytes] = []
        for (user_id, _), reply in zip(batch, replies, strict=True):
            if isinstance(reply, _HistoryPage):
                reply = await self._complete_history(user_id, reply)
            out.append(reply if isinstance(reply, bytes) else self._encoder.encode(reply))
        return out

    def _apply_one(
        self,
        user_id: str,
        request: ShardRequest,
        now: int,
        records: list[JournalRecord],
        pushes: list[tuple[str, bytes]],
        allowance: bool | None = None,
    ) -> bytes | Reply | _HistoryPage:
        state = self.users.get(user_id)
        if state is None:  # dropped after a failed flush while this batch loaded
            return self._error(request.rid, ErrorCode.UNAVAILABLE, "please retry")
        self.users.move_to_end(user_id)
        self._last_used[user_id] = time.monotonic()
        self._expire(user_id, state, now, records, pushes)
        try:
            match request:
                case State() | Inspect():
                    return state.view(request.rid)
                case History():
                    return self._history_from_memory(state, request)
                case _:
                    outcome: Outcome = handle(state, request, self.catalog, now, allowance)
        except RequestError as exc:
            return self._error(request.rid, exc.code, exc.message, exc.retry_after_ms)
        except Exception:
            log.exception(
                "bug while applying %s for %s; reloading the user", type(request).__name__, user_id
            )
            self.users.pop(user_id, None)
            return self._error(request.rid, ErrorCode.INTERNAL, "internal error")
        if outcome.change is not None:
            self._changed(user_id, state, outcome.change, outcome.pushes, records, pushes)
        return outcome.reply

    def _changed(
        self,
        user_id: str,
        state: UserState,
        change: Change,
        messages: list[ServerMessage],
        records: list[JournalRecord],
        pushes: list[tuple[str, bytes]],
    ) -> None:
        records.append(self._record(user_id, change))
        channel = user_channel(user_id)
        pushes.extend((channel, self._encoder.encode(p)) for p in messages)
        self._schedule_expiry(user_id, state)

    def _schedule_expiry(self, user_id: str, state: UserState) -> None:
        """Remember when the user's next item expires; one heap entry per time."""
        when = next_expiry(state)
        if when is not None and self._next_due.get(user_id) != when:
            self._next_due[user_id] = when
            heapq.heappush(self._expiries, (when, user_id))
            self._expiry_wake.set()

    def _expire(
        self,
        user_id: str,
        state: UserState,
        now: int,
        records: list[JournalRecord],
        pushes: list[tuple[str, bytes]],
    ) -> None:
        """Time-limited items whose expiry has come leave first (PROTOCOL.md §10)."""
        change = expire_due(state, now)
        if change is not None:
            self._changed(user_id, state, change, user_pushes(state, change), records, pushes)

    async def _load_due_expiries(self) -> None:
        """Schedule the expiries of this shard's users due within the next day,
        resident or not (so a restart loses none), then again every hour."""
        assert self._pool is not None
        while True:
            try:
                horizon = _now_ms() + 86_400_000
                for user_id, when in await store.load_due_expiries(self._pool, horizon):
                    if shard_index(user_id, self.settings.shards) != self.settings.shard:
                        continue
                    if ":" in user_id or self._next_due.get(user_id, when + 1) <= when:
                        continue
                    self._next_due[user_id] = when
                    heapq.heappush(self._expiries, (when, user_id))
                self._expiry_wake.set()
            except Exception as exc:
                log.warning("could not load due expiries: %r; retrying", exc)
                await asyncio.sleep(10)
                continue
            await asyncio.sleep(3600)

    async def _expire_on_time(self) -> None:
        """Expire items at their time, without waiting for a request: the user
        is activated if needed, the removal journaled and pushed."""
        while True:
            self._expiry_wake.clear()
            now = _now_ms()
            due: set[str] = set()
            while self._expiries and self._expiries[0][0] <= now:
                when, user_id = heapq.heappop(self._expiries)
                if self._next_due.get(user_id) == when:
                    del self._next_due[user_id]
                    due.add(user_id)
            if due:
                try:
                    await self._activate(due)
                    records: list[JournalRecord] = []
                    pushes: list[tuple[str, bytes]] = []
                    for user_id in due:
                        state = self.users.get(user_id)
                        if state is not None:
                            self._expire(user_id, state, _now_ms(), records, pushes)
                    await self._journal_and_push(records, pushes)
                except Exception as exc:  # retried: the items are still due
                    log.warning("expiry of %d users failed: %r; retrying", len(due), exc)
                    for user_id in due:
                        self._next_due[user_id] = now + 1000
                        heapq.heappush(self._expiries, (now + 1000, user_id))
                continue
            wait = (self._expiries[0][0] - now) / 1000 if self._expiries else 60.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._expiry_wake.wait(), min(wait, 60.0))

    async def _journal_and_push(
        self, records: list[JournalRecord], pushes: list[tuple[str, bytes]]
    ) -> None:
        assert self._journal is not None
        await self._journal.write(records)
        if self._pushes is not None:
            # Written to Redis now, before the answer goes out (publisher.py).
            self._pushes.publish(pushes)

    def _record(self, user_id: str, change: Change) -> JournalRecord:
        entry = change.ledger
        ledger = None
        if entry is not None:
            ledger = LedgerRow(
                entry.seq, entry.at, entry.kind, entry.amount, entry.balance,
                entry.sku, entry.quantity, entry.key,
            )  # fmt: skip
        return JournalRecord(
            user_id,
            change.version,
            change.at,
            change.kind,
            change.key,
            encode_change(change),
            ledger,
        )

    def _error(
        self,
        rid: str | int | None,
        code: ErrorCode,
        message: str,
        retry_after_ms: int | None = None,
    ) -> bytes:
        return self._encoder.encode(
            Error(rid=rid, code=code.value, message=message, retry_after_ms=retry_after_ms)
        )

    # ------------------------------------------------------------ activation

    async def _activate(self, user_ids: set[str]) -> None:
        """Make every user of a batch resident; load the missing ones in one query."""
        missing = [u for u in user_ids if u not in self.users and u not in self.allowances]
        if not missing:
            return
        mine = [u for u in missing if u not in self._loading]
        others = {self._loading[u] for u in missing if u in self._loading}
        if mine:
            assert self._pool is not None and self._journal is not None
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            for u in mine:
                self._loading[u] = done
            try:
                stored = await store.load_users(self._pool, mine)
                records: list[JournalRecord] = []
                now = _now_ms()
                for u in mine:
                    row = stored.get(u)
                    if ":" in u:  # an allowance (user ids have no ':')
                        self.allowances[u] = (
                            HostedAllowance(row.version, allowance_decoder.decode(row.state))
                            if row is not None
                            else HostedAllowance(0, AllowanceState())
                        )
                        continue
                    if row is not None:
                        state = UserState.restore(u, row.version, row.balance, row.state)
                        self.users[u] = state
                        self._schedule_expiry(u, state)
                        continue
                    state, change = new_user(u, self.settings.starting_balance, now)
                    self.users[u] = state
                    if change is not None:
                        records.append(self._record(u, change))
                self.activations += len(mine)
                seen = time.monotonic()
                for u in mine:
                    self._last_used[u] = seen
                # A new user's starting credit is journaled with the first batch.
                self._journal.write(records)
            finally:
                for u in mine:
                    del self._loading[u]
                done.set_result(None)
        for future in others:
            await future

    async def _load_keys(self, batch: list[BatchItem]) -> None:
        """Bring idempotency records the user evicted from memory back from the journal."""
        wanted: list[tuple[str, str]] = []
        for user_id, request in batch:
            key = (
                scoped_key(request) if not isinstance(request, State | Inspect | History) else None
            )
            state = self.users.get(user_id)
            if key and state is not None and not state.keys_complete and key not in state.keys:
                wanted.append((user_id, key))
        if not wanted:
            return
        assert self._pool is not None
        found = await store.load_changes_by_key(self._pool, wanted)
        for (user_id, key), data in found.items():
            state = self.users.get(user_id)
            change = decode_change(data)
            if state is not None and change.fingerprint and change.reply is not None:
                state.remember(key, change.fingerprint, change.reply)

    def _snapshot(self, user_id: str) -> UserRow:
        held = self.allowances.get(user_id)
        if held is not None:
            return UserRow(held.version, 0, allowance_encoder.encode(held.state))
        state = self.users[user_id]
        return UserRow(state.version, state.balance, state.snapshot(), next_expiry(state))

    def _drop_users(self, user_ids: set[str]) -> None:
        """After a failed flush: forget these users (and allowances); they
        reload from what is durable."""
        for u in user_ids:
            self.users.pop(u, None)
            self.allowances.pop(u, None)
            self._last_used.pop(u, None)
        log.warning("dropped %d users after a failed flush", len(user_ids))

    async def _passivate_idle(self) -> None:
        while True:
            await asyncio.sleep(min(10.0, self.settings.idle_seconds / 2))
            self.passivate(time.monotonic())

    def passivate(self, now: float) -> int:
        """Drop users idle for ``idle_seconds`` (or the least recently used
        beyond ``max_users``), except those with changes not yet durable."""
        assert self._journal is not None
        cutoff = now - self.settings.idle_seconds
        dropped = 0
        for user_id in list(self.users):  # least recently used first
            over = len(self.users) > self.settings.max_users
            if not over and self._last_used.get(user_id, now) > cutoff:
                break
            if self._journal.is_pending(user_id):
                continue
            del self.users[user_id]
            self._last_used.pop(user_id, None)
            dropped += 1
        self.passivations += dropped
        if dropped:
            log.info("passivated %d idle users; %d resident", dropped, len(self.users))
        return dropped

    # ------------------------------------------------------------ allowances

    def _background(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    # --------------------------------------------------------------- history

    def _history_from_memory(self, state: UserState, request: History) -> Reply | _HistoryPage:
        """A history page from the in-memory ledger tail, if it covers the page."""
        entries = [
            e for e in reversed(state.ledger) if request.before is None or e.seq < request.before
        ]
        if state.ledger_complete or len(entries) > request.limit:
            return _page(request, entries)
        # Older entries are in the ledger table: everything below the tail's
        # first entry is durable once this batch is (flushes are in order).
        bound = state.ledger[0].seq if state.ledger else (request.before or 2**63 - 1)
        if request.before is not None:
            bound = min(bound, request.before)
        return _HistoryPage(request, entries, bound)

    async def _complete_history(self, user_id: str, page: _HistoryPage) -> HistoryReply:
        assert self._pool is not None
        wanted = page.request.limit + 1 - len(page.entries)
        rows = await store.load_ledger(self._pool, user_id, page.bound, wanted)
        return _page(page.request, page.entries + [LedgerEntry(**dict(r)) for r in rows])


@dataclass
class _HistoryPage:
    """A history page waiting for older entries from the ledger table."""

    request: History
    entries: list[LedgerEntry]
    bound: int


def _page(request: History, entries: list[LedgerEntry]) -> HistoryReply:
    """``entries`` newest first, possibly one more than a page (then ``next`` is set)."""
    more = len(entries) > request.limit
    entries = entries[: request.limit]
    return HistoryReply(rid=request.rid, entries=entries, next=entries[-1].seq if more else None)
