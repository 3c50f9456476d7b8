"""The shard's side of the sagas on allowances (stock of limited items, uses
of promo codes): reserving before a batch is applied, settling after, the
allowance entities a shard hosts, and the sweeper for what a crash left
behind.  What to do at each turn is decided by pure code in ``actors.saga``;
the rules of an allowance are in ``actors.allowance``.

``SagaCoordinator`` is a collaborator of ``ShardHost``: it gets what it uses
(residents, the catalog, a way to call the shard hosting an allowance) in its
constructor and its connections at ``attach``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from actors import allowance as allowances
from actors.allowance import allowance_id
from actors.catalog import Catalog
from actors.routing import STOCK_LEFT_KEY, stock_channel
from actors.saga import (
    RESERVATION_MS,
    SETTLE_AFTER_MS,
    Answer,
    Hold,
    HoldState,
    SagaStep,
    Step,
    left_behind,
    needs_reservation,
    reservation_id,
)
from actors.shard.ownership import Ownership
from actors.shard.records import BatchItem
from actors.shard.residents import Residents, allowance_encoder
from actors.user import KeyRecord, fingerprint, scoped_key
from persistence import store
from persistence.journal import Journal, JournalError, JournalRecord
from protocol.messages import Purchase, Redeem

__all__ = ["Moved", "SagaCoordinator", "StepCaller"]

log = logging.getLogger("loadout.shard")

#: Calls a shard's ``apply_steps`` (this one's, or a peer's through Ray) with
#: the caller's catalog version; an ``Answer`` per step.
StepCaller = Callable[[int, int, list[SagaStep]], Awaitable[list[Answer]]]
_REFUSED = Answer(0)


class Moved(JournalError):
    """Steps for allowances of partitions this shard does not serve: not applied."""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class SagaCoordinator:
    def __init__(
        self,
        ownership: Ownership,
        residents: Residents,
        catalog: Callable[[], Catalog],
        refresh_catalog: Callable[[int], Awaitable[None]],
        call: StepCaller,
        background: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self._ownership = ownership
        self._residents = residents
        self._catalog = catalog
        self._refresh_catalog = refresh_catalog
        self._call = call
        self._background = background
        self._pool: asyncpg.Pool | None = None
        self._redis: aioredis.Redis | None = None
        self._journal: Journal | None = None

    def attach(self, pool: asyncpg.Pool, redis: aioredis.Redis, journal: Journal) -> None:
        self._pool, self._redis, self._journal = pool, redis, journal

    # ------------------------------------------------------- the user's side

    async def reserve(
        self, batch: Sequence[BatchItem], now: int, found: dict[tuple[str, str], KeyRecord]
    ) -> dict[int, Hold]:
        """Reserve units for the batch's new requests that need them, one call
        per shard hosting the allowances; the answer per batch index."""
        catalog = self._catalog()
        wanted: dict[int, list[tuple[int, SagaStep]]] = {}
        for i, (user_id, request) in enumerate(batch):
            if not isinstance(request, Purchase | Redeem):
                continue
            state = self._residents.users.get(user_id)
            key = scoped_key(request)
            if state is None or key is None or key in state.keys or (user_id, key) in found:
                continue  # not resident (answered unavailable), or a replay
            need = needs_reservation(state, request, catalog, now)
            if need is None:
                continue
            res = reservation_id(user_id, request.key, fingerprint(request).hex())
            step = SagaStep(
                Step.RESERVE, need.allowance, res, need.quantity, now + RESERVATION_MS,
                user_id, request.key,
            )  # fmt: skip
            wanted.setdefault(self._ownership.owner(need.allowance), []).append((i, step))
        holds: dict[int, Hold] = {}
        if not wanted:
            return holds

        async def ask(shard: int, items: list[tuple[int, SagaStep]]) -> None:
            try:
                answers = await self._call(shard, catalog.version, [step for _, step in items])
            except Exception as exc:
                log.warning("allowance shard %d did not answer: %r", shard, exc)
                self._background(_refresh(self._ownership))  # it may have moved
                for i, step in items:
                    holds[i] = Hold(HoldState.UNREACHABLE, step)
                return
            for (i, step), answer in zip(items, answers, strict=True):
                if answer.deadline:  # the reservation's own deadline: the one to apply by
                    granted = SagaStep(
                        step.step, step.allowance, step.reservation, step.quantity,
                        answer.deadline, step.user, step.key,
                    )  # fmt: skip
                    holds[i] = Hold(HoldState.GRANTED, granted, answer.created)
                else:
                    holds[i] = Hold(HoldState.REFUSED, step)

        await asyncio.gather(*(ask(shard, items) for shard, items in wanted.items()))
        return holds

    def settle(self, steps: list[SagaStep]) -> None:
        """Confirm or release reservations, in the background; what fails here
        the sweeper settles later."""
        if steps:
            self._background(self._settle(steps))

    async def _settle(self, steps: list[SagaStep]) -> None:
        by_shard: dict[int, list[SagaStep]] = {}
        for step in steps:
            by_shard.setdefault(self._ownership.owner(step.allowance), []).append(step)
        for shard, items in by_shard.items():
            try:
                await self._call(shard, self._catalog().version, items)
            except Exception as exc:
                log.warning(
                    "could not settle %d reservations on shard %d: %r", len(items), shard, exc
                )

    # -------------------------------------------------- the allowance's side

    def _capacity(self, entity: str) -> int:
        kind, _, name = entity.partition(":")
        catalog = self._catalog()
        if kind == "stock":
            item = catalog.lookup(name)
            return item.stock if item is not None and item.stock is not None else 0
        promo = catalog.promos.get(name)
        return promo.max_uses if promo is not None else 0

    async def apply_steps(self, catalog_version: int, steps: list[SagaStep]) -> list[Answer]:
        """Apply saga steps to allowances hosted here; answer once durable.

        Raises ``JournalError`` (the caller answers ``unavailable``) if the
        steps could not be made durable."""
        journal = self._journal
        assert journal is not None
        if journal.fenced:
            raise JournalError("this shard has a newer owner")
        elsewhere = sorted({s.allowance for s in steps if not self._ownership.serves(s.allowance)})
        if elsewhere:
            raise Moved(f"not served here (moved or moving): {elsewhere[:3]}")
        await self._refresh_catalog(catalog_version)
        entities = {s.allowance for s in steps}
        self._residents.hold(entities)
        try:
            await self._residents.activate(entities, lambda user, state: None)
            records, results = self._apply_steps(steps)
            written = journal.write(records)
        finally:
            self._residents.release(entities)
        rejected = await written
        if rejected:
            await self._ownership.refresh()
            moved = sorted(e for e in rejected if not self._ownership.serves(e))
            if moved:  # the caller learns the steps did not happen, and retries
                raise Moved(f"moved while applying: {moved[:3]}")
        if rejected:  # their steps did not happen: nothing was reserved
            results = [
                _REFUSED if s.allowance in rejected else r
                for s, r in zip(steps, results, strict=True)
            ]
        stocks = [e.partition(":")[2] for e in entities - rejected if e.startswith("stock:")]
        if stocks:
            self._background(self._announce_stock(stocks))
        return results

    def _apply_steps(self, steps: list[SagaStep]) -> tuple[list[JournalRecord], list[Answer]]:
        now = _now_ms()
        records: list[JournalRecord] = []
        results: list[Answer] = []
        for step in steps:
            held = self._residents.allowances.get(step.allowance)
            if held is None:
                results.append(_REFUSED)
                continue
            res = step.reservation
            created = False
            if step.step is Step.RESERVE:
                ok, moved, created = allowances.reserve(
                    held.state, res, step.quantity, self._capacity(step.allowance),
                    step.deadline, step.user, step.key,
                )  # fmt: skip
            elif step.step is Step.CONFIRM:
                ok = moved = allowances.confirm(held.state, res)
            else:  # RELEASE, or ABANDON by the sweeper (recorded as the outcome)
                ok = moved = allowances.release(held.state, res, step.deadline)
            if ok and step.step is Step.RESERVE:
                results.append(Answer(held.state.reservations[res].deadline, created))
            else:
                results.append(Answer(int(ok)))
            if moved:
                held.version += 1
                outcome = (res, step.deadline, "released") if step.step is Step.ABANDON else None
                records.append(
                    JournalRecord(
                        step.allowance,
                        held.version,
                        now,
                        "allowance." + step.step.value,
                        None,
                        allowance_encoder.encode(step),
                        None,
                        outcome,
                    )
                )
        return records, results

    async def sweep_left_behind(self) -> None:
        """Every few seconds, settle what a crash left behind (``sweep``)."""
        while True:
            await asyncio.sleep(5)
            try:
                await self.sweep(_now_ms())
            except Exception as exc:
                log.warning("could not settle reservations left behind: %r", exc)

    async def sweep(self, now: int) -> int:
        """Settle reservations well past their deadline: confirm those whose
        sale is recorded, release the others.  Returns how many."""
        stale = [
            (entity, res, r)
            for entity, held in list(self._residents.allowances.items())
            if self._ownership.serves(entity)
            for res, r in held.state.reservations.items()
            if r.deadline + SETTLE_AFTER_MS < now
        ]
        if not stale:
            return 0
        assert self._pool is not None
        sold = await store.load_sold(self._pool, [res for _, res, _ in stale])
        steps = [
            SagaStep(left_behind(r.since, r.deadline, sold.get(res, [])), entity, res,
                     r.quantity, r.deadline, r.user, r.key)
            for entity, res, r in stale
        ]  # fmt: skip
        await self.apply_steps(self._catalog().version, steps)
        log.info("settled %d reservations left behind", len(steps))
        return len(steps)

    # ------------------------------------------------------------ announcing

    async def announce_all_stock(self) -> None:
        """Announce what is left of every limited item hosted here: at start and
        when a catalog (which may change a ``stock``) goes live."""
        ids = {
            allowance_id("stock", sku)
            for sku, item in self._catalog().items.items()
            if item.stock is not None and self._ownership.serves(allowance_id("stock", sku))
        }
        if not ids:
            return
        try:
            await self._residents.activate(ids, lambda user, state: None)
        except Exception as exc:
            log.warning("could not load the stock of limited items: %r", exc)
            return
        await self._announce_stock([i.partition(":")[2] for i in ids])

    async def _announce_stock(self, skus: list[str]) -> None:
        assert self._redis is not None
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for sku in skus:
                    left = self.stock_left(sku)
                    if left is not None:
                        pipe.hset(STOCK_LEFT_KEY, sku, left)
                        pipe.publish(stock_channel(), allowance_encoder.encode((sku, left)))
                await pipe.execute()
        except Exception as exc:  # the catalog shows a stale count; sales are not affected
            log.warning("could not announce stock of %s: %r", skus, exc)

    def stock_left(self, sku: str) -> int | None:
        held = self._residents.allowances.get(allowance_id("stock", sku))
        item = self._catalog().lookup(sku)
        if item is None or item.stock is None:
            return None
        return item.stock if held is None else allowances.left(held.state, item.stock)


async def _refresh(ownership: Ownership) -> None:
    try:
        await ownership.refresh()
    except Exception as exc:
        log.warning("could not read the partition map: %r", exc)
