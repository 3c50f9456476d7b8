"""The shard host: many user entities in one process, and their journal.

``ShardHost`` is the asyncio adapter around the pure rules in ``actors.user``:
it applies a batch of requests in order with no ``await`` between reading
and writing a user, journals the changes, answers only once they are
durable, and publishes pushes to Redis.  Its collaborators each own one
concern: ``Residents`` (activation, passivation, idempotency lookups),
``SagaCoordinator`` (limited items and promo codes), ``ExpiryScheduler``
(items that expire).  ``actors.shard.actor`` wraps the host in a Ray actor;
tests drive it directly.

A batch, step by step (DESIGN.md, "Exactly once, whatever the history"):

1. hold its users (from here on none is passivated and no key record of
   theirs leaves memory), refresh the catalog, activate the users;
2. look up the keys that are in neither memory nor this process's history
   in the journal's index, and reserve units for limited items;
3. **with no await from here to the journal write**: apply each request
   (a key's record is found in memory or in what step 2 read), collect the
   records and pushes; a bug raised mid-change makes its user *in doubt*:
   its changes not yet durable are dropped, it is forgotten and reloads
   from what is durable;
4. await the write; entities the journal rejected (their records could not
   be written as they are) are answered from the journal or ``unavailable``;
   publish the pushes, settle reservations, answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as aioredis

from actors.catalog import Catalog
from actors.catalog_source import load_live_catalog
from actors.events import Change
from actors.money import PurchaseFacts
from actors.routing import user_channel
from actors.saga import STEP_TIMEOUT, Answer, Hold, HoldState, Result, SagaStep, settlement
from actors.shard.coordinator import SagaCoordinator, StepCaller
from actors.shard.expiry import ExpiryScheduler
from actors.shard.fulfillment import OrdersQuery, answer_orders, load_refund_facts
from actors.shard.history import HistoryPage, complete_history, page_from_memory
from actors.shard.ownership import Ownership
from actors.shard.partitioning import Partitions
from actors.shard.records import MOVED, BatchItem, ShardRequest, error_reply, record_of
from actors.shard.residents import Residents
from actors.user import (
    KeyRecord,
    Outcome,
    UserState,
    expire_due,
    handle,
    replay,
    scoped_key,
)
from actors.user import pushes as user_pushes
from persistence import store
from persistence.journal import Journal, JournalError, JournalRecord
from persistence.publisher import PushPublisher
from protocol.errors import ErrorCode, RequestError
from protocol.messages import (
    History,
    Inspect,
    Reply,
    ServerMessage,
    State,
)
from protocol.money import Orders, Refund

__all__ = ["ShardHost", "ShardSettings"]

log = logging.getLogger("loadout.shard")

#: What ``unavailable`` says when the outcome of a change is not known.
UNKNOWN_OUTCOME = (
    "the change could not be confirmed durable: it may or may not have been applied;"
    " retry with the same key"
)
#: ...and when it is known that the request was not applied.
NOT_APPLIED = "the request was not applied; retry with the same key"


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


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class _Applying:
    """What the synchronous part of a batch collects."""

    batch: list[BatchItem]
    now: int
    found: dict[tuple[str, str], KeyRecord]
    holds: dict[int, Hold]
    replies: list[bytes | Reply | HistoryPage | OrdersQuery] = field(default_factory=list)
    #: Per batch index of a ``refund``: what its purchase did (None: no such purchase).
    facts: dict[int, PurchaseFacts | None] = field(default_factory=dict)
    records: list[JournalRecord] = field(default_factory=list)
    #: (user, msgpack push) in order.
    pushes: list[tuple[str, bytes]] = field(default_factory=list)
    #: Per batch index holding a reservation: what became of it.
    results: dict[int, Result] = field(default_factory=dict)
    #: Users a bug left in doubt, and the indexes of the requests that hit it.
    doubted: set[str] = field(default_factory=set)
    bugs: set[int] = field(default_factory=set)


class ShardHost:
    def __init__(self, settings: ShardSettings, call: StepCaller | None = None) -> None:
        self.settings = settings
        self.catalog = Catalog.empty()
        self.residents = Residents(
            settings.starting_balance, settings.idle_seconds, settings.max_users
        )
        self.ownership = Ownership(settings.shard)
        self.expiry = ExpiryScheduler(self.ownership.serves, self._expire_users)
        self.saga = SagaCoordinator(
            self.ownership,
            self.residents,
            lambda: self.catalog,
            self.refresh_catalog,
            call or self._call_self,
            self._background,
        )
        self.partitions = Partitions(
            self.ownership, self.residents, self.expiry, self.saga, self._background
        )
        self._pool: asyncpg.Pool | None = None
        self._redis: aioredis.Redis | None = None
        self._journal: Journal | None = None
        self._pushes: PushPublisher | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._encoder = msgspec.msgpack.Encoder()
        self.epoch = 0
        #: Called once if a newer owner fences this shard out (the actor retires).
        self.on_fenced: Callable[[], None] = lambda: None

    # ------------------------------------------------------------------ life

    async def start(self) -> None:
        """Connect, take the shard's epoch, and start the background tasks.
        On failure whatever was opened is closed again, so start may be retried."""
        s = self.settings
        try:
            self._pool = await store.open_pool(s.database_url, max_size=s.pool_size)
            self._redis = aioredis.from_url(s.redis_url)
            self.epoch = await store.acquire_epoch(self._pool, s.shard)
            self.catalog = await load_live_catalog(self._pool)
            self.partitions.attach(self._pool, None)
            await self.partitions.reload_map()
        except BaseException:
            await self._disconnect()
            raise
        self._journal = Journal(
            self._pool,
            s.shard,
            self.epoch,
            self.residents.snapshot,
            self.residents.forget,
            interval=s.flush_interval,
            on_fenced=lambda: self.on_fenced(),
            partition_of=self.ownership.partition,
        )
        self._journal.start()
        self.partitions.attach(self._pool, self._journal)
        self.residents.attach(self._pool, self._journal)
        self.saga.attach(self._pool, self._redis, self._journal)
        self._pushes = PushPublisher(self._redis, s.push_queue)
        await self._pushes.start()
        self._tasks = [
            asyncio.create_task(self._passivate_idle(), name="passivation"),
            asyncio.create_task(self.expiry.run(), name="expiry"),
            asyncio.create_task(self.expiry.load_due(self._pool), name="due-expiries"),
            asyncio.create_task(self.saga.sweep_left_behind(), name="settle"),
            asyncio.create_task(self.partitions.follow(), name="map"),
        ]
        log.info(
            "shard %d started with epoch %d, catalog v%d, map epoch %d (%d partitions)",
            s.shard, self.epoch, self.catalog.version, self.ownership.epoch,
            len(self.ownership.owned),
        )  # fmt: skip
        self._background(self.saga.announce_all_stock())

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
        await self._disconnect()
        log.info("shard %d closed", self.settings.shard)

    async def _disconnect(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def stats(self) -> dict[str, Any]:
        journal = self._journal
        return {
            "shard": self.settings.shard,
            "epoch": self.epoch,
            "users": len(self.residents.users),
            "activations": self.residents.activations,
            "passivations": self.residents.passivations,
            "catalog": self.catalog.version,
            "flushes": journal.flushes if journal else 0,
            "flush_p99_ms": _p99_ms(journal.durations) if journal else 0.0,
            "flushed_records": journal.flushed_records if journal else 0,
            "rejections": journal.rejections if journal else 0,
            "fenced": journal.fenced if journal else False,
            "dropped_pushes": self._pushes.dropped if self._pushes else 0,
            "map_epoch": self.ownership.epoch,
            "partitions": sorted(self.ownership.owned),
            "leaving": sorted(self.ownership.leaving),
        }

    def stock_left(self, sku: str) -> int | None:
        return self.saga.stock_left(sku)

    async def apply_steps(self, catalog_version: int, steps: list[SagaStep]) -> list[Answer]:
        """Saga steps on allowances hosted here (from this shard or a peer)."""
        with self.partitions.applying():
            return await self.saga.apply_steps(catalog_version, steps)

    async def _call_self(self, shard: int, version: int, steps: list[SagaStep]) -> list[Answer]:
        return await asyncio.wait_for(self.apply_steps(version, steps), STEP_TIMEOUT)

    async def refresh_catalog(self, version: int) -> None:
        """Load the live catalog if the caller has seen a newer one than ours."""
        if version <= self.catalog.version:
            return
        assert self._pool is not None
        catalog = await load_live_catalog(self._pool)
        if catalog.version > self.catalog.version:  # two reloads may finish out of order
            self.catalog = catalog
            self._background(self.saga.announce_all_stock())

    def _background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def _passivate_idle(self) -> None:
        while True:
            await asyncio.sleep(min(10.0, self.settings.idle_seconds / 2))
            self.residents.passivate(time.monotonic())

    async def reload_map(self) -> None:
        await self.partitions.reload_map()

    async def release(self, partitions: list[int]) -> list[int]:
        """Hand these partitions over (``Partitions.release``)."""
        return await self.partitions.release(partitions)

    # ----------------------------------------------------------------- batch

    async def apply_batch(
        self, catalog_version: int, batch: list[BatchItem], map_epoch: int = 0
    ) -> list[bytes]:
        """Apply a batch in order; reply (msgpack, one per item) once durable.
        Requests for partitions this shard does not serve are answered
        ``MOVED`` (not applied); ``map_epoch`` is the sender's map."""
        if map_epoch > self.ownership.epoch:
            await self.reload_map()
        served = [self.ownership.serves(user) for user, _ in batch]
        if all(served):
            with self.partitions.applying():
                return await self._apply_batch(catalog_version, batch)
        mine = [item for item, ok in zip(batch, served, strict=True) if ok]
        with self.partitions.applying():
            replies = iter(await self._apply_batch(catalog_version, mine) if mine else [])
        return [next(replies) if ok else MOVED for ok in served]

    async def _apply_batch(self, catalog_version: int, batch: list[BatchItem]) -> list[bytes]:
        journal = self._journal
        assert journal is not None
        if journal.fenced:
            return [
                error_reply(r.rid, ErrorCode.UNAVAILABLE, "shard moved; retry") for _, r in batch
            ]
        users = {user for user, _ in batch}
        self.residents.hold(users)
        try:
            await self.refresh_catalog(catalog_version)
            await self.residents.activate(users, self.expiry.schedule)
            found = await self.residents.lookup_keys(_keys_of(batch))
            facts = {}
            if any(isinstance(request, Refund) for _, request in batch):
                assert self._pool is not None
                facts = await load_refund_facts(self._pool, batch)
            now = _now_ms()
            holds = await self.saga.reserve(batch, now, found)
            # No await from here until the records are handed to the journal.
            work = _Applying(batch, now, found, holds, facts=facts)
            for i, (user_id, request) in enumerate(batch):
                work.replies.append(self._apply_one(work, i, user_id, request))
            if work.doubted:
                self._set_aside(work)
            written = journal.write(work.records)
        finally:
            self.residents.release(users)
        try:
            rejected = await written
        except JournalError as exc:
            log.warning("batch of %d not made durable: %s", len(batch), exc)
            # Whether the sales committed is not known: the sweeper settles them.
            self._settle(work, unknown=True)
            return [error_reply(r.rid, ErrorCode.UNAVAILABLE, UNKNOWN_OUTCOME) for _, r in batch]
        if rejected & users:
            await self.reload_map()  # a partition may have moved under us
            await self._answer_rejected(work, rejected)
        self._durable(work.records, rejected)
        if self._pushes is not None:
            # Written to Redis now, before the answer goes out (publisher.py).
            self._pushes.publish(
                [(user_channel(u), data) for u, data in work.pushes if u not in rejected]
            )
        self._settle(work, unknown=False)
        out: list[bytes] = []
        for (user_id, _), reply in zip(batch, work.replies, strict=True):
            if isinstance(reply, HistoryPage):
                assert self._pool is not None
                reply = await complete_history(self._pool, user_id, reply)
            elif isinstance(reply, OrdersQuery):
                assert self._pool is not None
                reply = await answer_orders(self._pool, user_id, reply.request)
            out.append(reply if isinstance(reply, bytes) else self._encoder.encode(reply))
        return out

    def _apply_one(
        self, work: _Applying, i: int, user_id: str, request: ShardRequest
    ) -> bytes | Reply | HistoryPage | OrdersQuery:
        hold = work.holds.get(i)
        if hold is not None:
            work.results[i] = Result.UNUSED  # unless its sale is recorded below
        state = self.residents.touch(user_id)
        if state is None or user_id in work.doubted:
            # Forgotten after a failed flush (or a move) while this batch
            # loaded, or a bug earlier in this batch: not applied.
            if not self.ownership.serves(user_id):
                return MOVED
            return error_reply(request.rid, ErrorCode.UNAVAILABLE, NOT_APPLIED)
        if hold is not None and hold.state is HoldState.UNREACHABLE:
            return error_reply(request.rid, ErrorCode.UNAVAILABLE, NOT_APPLIED)
        if hold is not None and hold.state is HoldState.GRANTED and _now_ms() >= hold.step.deadline:
            # Too late to use the reservation (the deadline the sweeper relies on).
            return error_reply(request.rid, ErrorCode.UNAVAILABLE, NOT_APPLIED)
        try:
            self._expire(user_id, state, work)
            match request:
                case State() | Inspect():
                    return state.view(request.rid)
                case History():
                    return page_from_memory(state, request)
                case Orders():
                    return OrdersQuery(request)
                case _:
                    key = scoped_key(request)
                    if key is not None and key not in state.keys:
                        known = work.found.get((user_id, key))
                        if known is not None:  # read back from the journal before the apply
                            state.remember(key, known)
                    granted = None if hold is None else hold.state is HoldState.GRANTED
                    outcome: Outcome = handle(
                        state, request, self.catalog, work.now, granted, work.facts.get(i)
                    )
        except RequestError as exc:
            return error_reply(request.rid, exc.code, exc.message, exc.retry_after_ms)
        except Exception:
            log.exception(
                "bug while applying %s for %s; the user reloads from the database",
                type(request).__name__, user_id,
            )  # fmt: skip
            work.doubted.add(user_id)
            work.bugs.add(i)
            return error_reply(request.rid, ErrorCode.INTERNAL, "internal error")
        if outcome.change is not None:
            self._changed(user_id, state, outcome.change, outcome.pushes, work)
            if hold is not None and hold.state is HoldState.GRANTED:
                res, deadline = hold.step.reservation, hold.step.deadline
                work.records[-1] = work.records[-1]._replace(outcome=(res, deadline, "sold"))
                work.results[i] = Result.SOLD
        return outcome.reply

    def _set_aside(self, work: _Applying) -> None:
        """A bug left users in doubt: nothing of theirs that is not yet durable
        may become so (their state may be half-changed).  Their other requests
        of this batch are not applied; their buffered records of earlier
        batches are dropped (those batches answer them ``unavailable``); they
        reload from the database once their records in flight have settled."""
        doubted = work.doubted
        work.records = [r for r in work.records if r.user_id not in doubted]
        work.pushes = [(u, p) for u, p in work.pushes if u not in doubted]
        for i, (user_id, request) in enumerate(work.batch):
            if user_id in doubted and i not in work.bugs:
                work.replies[i] = error_reply(request.rid, ErrorCode.UNAVAILABLE, NOT_APPLIED)
                if i in work.results:
                    work.results[i] = Result.UNUSED
        assert self._journal is not None
        self._journal.purge(doubted)
        self.residents.forget(doubted)

    async def _answer_rejected(self, work: _Applying, rejected: frozenset[str]) -> None:
        """The journal left these users' records out: what this batch said of
        them is not durable.  A key already in the journal gets its original
        reply (a duplicate resolves to that record); anything else was not
        applied."""
        wanted = [
            (user_id, key)
            for user_id, request in work.batch
            if user_id in rejected and (key := _key_of(request)) is not None
        ]
        durable = await self.residents.read_keys(wanted)
        for i, (user_id, request) in enumerate(work.batch):
            if user_id not in rejected:
                continue
            if i in work.results:
                work.results[i] = Result.UNUSED
            reply: bytes | Reply = (
                error_reply(request.rid, ErrorCode.UNAVAILABLE, NOT_APPLIED)
                if self.ownership.serves(user_id)
                else MOVED
            )
            key = _key_of(request)
            record = durable.get((user_id, key)) if key is not None else None
            if record is not None:
                try:
                    reply = replay(record, request)  # type: ignore[arg-type]
                except RequestError as exc:
                    reply = error_reply(request.rid, exc.code, exc.message)
            work.replies[i] = reply

    def _durable(self, records: list[JournalRecord], rejected: frozenset[str]) -> None:
        versions: dict[str, int] = {}
        for record in records:
            if record.user_id not in rejected and ":" not in record.user_id:
                versions[record.user_id] = record.version
        self.residents.durable(versions)

    def _settle(self, work: _Applying, *, unknown: bool) -> None:
        """Confirm the sales, release the unused units; with ``unknown`` (the
        write failed) the sales are left to the sweeper."""
        steps: list[SagaStep] = []
        for i, result in work.results.items():
            hold = work.holds[i]
            # UNREACHABLE: the reserve may have happened with its answer lost;
            # the retry of this request finds that reservation and uses it.
            if hold.state is not HoldState.GRANTED:
                continue
            if unknown and result is Result.SOLD:
                result = Result.UNKNOWN
            step = settlement(result, hold.created)
            if step is not None:
                steps.append(hold.step.then(step))
        self.saga.settle(steps)

    def _changed(
        self,
        user_id: str,
        state: UserState,
        change: Change,
        messages: list[ServerMessage],
        work: _Applying,
    ) -> None:
        work.records.append(record_of(user_id, change))
        work.pushes.extend((user_id, self._encoder.encode(p)) for p in messages)
        self.expiry.schedule(user_id, state)

    def _expire(self, user_id: str, state: UserState, work: _Applying) -> None:
        """Time-limited items whose expiry has come leave first (PROTOCOL.md §10)."""
        change = expire_due(state, work.now)
        if change is not None:
            self._changed(user_id, state, change, user_pushes(state, change), work)

    async def _expire_users(self, due: set[str]) -> None:
        """The expiry scheduler's call: expire what is due for these users now,
        activating them if needed, journaled and pushed."""
        assert self._journal is not None
        due = {user for user in due if self.ownership.serves(user)}
        with self.partitions.applying():
            await self._expire_served(due)

    async def _expire_served(self, due: set[str]) -> None:
        assert self._journal is not None
        self.residents.hold(due)
        try:
            await self.residents.activate(due, self.expiry.schedule)
            work = _Applying([], _now_ms(), {}, {})
            for user_id in due:
                state = self.residents.users.get(user_id)
                if state is None:
                    continue
                try:
                    self._expire(user_id, state, work)
                except Exception:
                    log.exception("bug while expiring items of %s; it reloads", user_id)
                    work.doubted.add(user_id)
            if work.doubted:
                self._set_aside(work)
            written = self._journal.write(work.records)
        finally:
            self.residents.release(due)
        rejected = await written
        self._durable(work.records, rejected)
        if self._pushes is not None:
            self._pushes.publish(
                [(user_channel(u), data) for u, data in work.pushes if u not in rejected]
            )


def _p99_ms(durations: Iterable[float]) -> float:
    ordered = sorted(durations)
    return round(1e3 * ordered[int(len(ordered) * 0.99)], 2) if ordered else 0.0


def _key_of(request: ShardRequest) -> str | None:
    if isinstance(request, State | Inspect | History | Orders):
        return None
    return scoped_key(request)


def _keys_of(batch: list[BatchItem]) -> list[tuple[str, str]]:
    return [(user, key) for user, request in batch if (key := _key_of(request)) is not None]
