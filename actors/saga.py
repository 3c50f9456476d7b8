"""The shard's side of the sagas on allowances (stock of limited items, uses
of promo codes): reserving before a batch is applied, settling after, and the
allowance entities a shard hosts.  The rules of an allowance are pure code in
``actors.allowance``; see its docstring for the saga itself.

``SagaMixin`` is part of ``ShardHost`` (actors.host), split out to keep each
file one concern; it uses the host's users, catalog, journal and activation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg
import msgspec
import redis.asyncio as aioredis

from actors import allowance as allowances
from actors.allowance import AllowanceState, allowance_id, reservation_id
from actors.catalog import Catalog
from actors.events import decode_change
from actors.routing import STOCK_LEFT_KEY, shard_index, stock_channel
from actors.user import UserState, fingerprint, redeem_check, scoped_key
from persistence import store
from persistence.journal import Journal, JournalError, JournalRecord
from protocol.errors import RequestError
from protocol.messages import Purchase, Redeem

if TYPE_CHECKING:
    from actors.host import BatchItem, ShardRequest, ShardSettings

__all__ = [
    "RESERVATION_MS",
    "SETTLE_AFTER_MS",
    "AllowanceCaller",
    "AllowanceOp",
    "HostedAllowance",
    "SagaMixin",
    "allowance_decoder",
    "allowance_encoder",
]

log = logging.getLogger("loadout.shard")

#: One step of a saga on an allowance: (op, allowance id, reservation id,
#: quantity, deadline ms, user, idempotency key); op is reserve|confirm|release.
AllowanceOp = tuple[str, str, str, int, int, str, str]
#: Calls a shard's ``apply_allowances`` (this one's, or a peer's through Ray).
#: The answer per step is 0 when refused; else 1, or for a reserve the
#: reservation's deadline (a retry may have moved it later).
AllowanceCaller = Callable[[int, int, list[AllowanceOp]], Awaitable[list[int]]]
#: A purchase must be applied this soon after its unit was reserved...
RESERVATION_MS = 10_000
#: ...and a reservation left behind is settled only this long after that:
#: longer than a journal flush may take (statement_timeout, persistence.store)
#: twice over, so a purchase applied in time is durable before it is settled.
SETTLE_AFTER_MS = 120_000

allowance_encoder = msgspec.msgpack.Encoder()
allowance_decoder = msgspec.msgpack.Decoder(AllowanceState)


@dataclass
class HostedAllowance:
    version: int
    state: AllowanceState


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class SagaMixin:
    """Allowance hosting and saga steps of a ``ShardHost``."""

    # Provided by ShardHost.
    settings: ShardSettings
    users: dict[str, UserState]
    allowances: dict[str, HostedAllowance]
    catalog: Catalog
    _call: AllowanceCaller
    _journal: Journal | None
    _pool: asyncpg.Pool | None
    _redis: aioredis.Redis | None

    async def _activate(self, user_ids: set[str]) -> None:
        raise NotImplementedError

    async def _reload_catalog(self) -> None:
        raise NotImplementedError

    def _background(self, coroutine: Awaitable[None]) -> None:
        raise NotImplementedError

    async def _announce_all_stock(self) -> None:
        """Announce what is left of every limited item hosted here: at start and
        when a catalog (which may change a ``stock``) goes live."""
        ids = {
            allowance_id("stock", sku)
            for sku, item in self.catalog.items.items()
            if item.stock is not None
            and shard_index(allowance_id("stock", sku), self.settings.shards) == self.settings.shard
        }
        if not ids:
            return
        try:
            await self._activate(ids)
        except Exception as exc:
            log.warning("could not load the stock of limited items: %r", exc)
            return
        await self._announce_stock([i.partition(":")[2] for i in ids])

    def _needs_allowance(
        self, user_id: str, request: ShardRequest, now: int
    ) -> tuple[str, int] | None:
        """The allowance a request must reserve before it is applied, if any."""
        state = self.users.get(user_id)
        if state is None or not isinstance(request, Purchase | Redeem):
            return None
        if "p:" + request.key in state.keys:
            return None  # a replay: nothing to reserve
        if isinstance(request, Redeem):
            try:
                redeem_check(state, request, self.catalog, now)
            except RequestError:
                return None  # refused by the user's own rules: no use reserved
            return allowance_id("promo", request.code), 1
        item = self.catalog.items.get(request.sku)
        if item is None or item.stock is None:
            return None
        price, _ = self.catalog.price_at(item, now)
        if price != request.price or price * request.quantity > state.balance:
            return None  # refused anyway; reserve nothing
        return allowance_id("stock", item.sku), request.quantity

    async def _reserve(self, batch: list[BatchItem], now: int) -> dict[int, AllowanceOp | str]:
        """Reserve stock units and promo uses for the batch's requests that need
        them, one call per shard hosting them; the answer per batch index is
        the reserve op (op[0] "reserve" if granted, "refused" if not) or
        "unavailable" when the allowance's shard did not answer."""
        wanted: dict[int, list[tuple[int, AllowanceOp]]] = {}
        for i, (user_id, request) in enumerate(batch):
            need = self._needs_allowance(user_id, request, now)
            if need is None:
                continue
            entity, quantity = need
            key = request.key  # type: ignore[union-attr]
            print_ = fingerprint(request).hex()  # type: ignore[arg-type]
            op: AllowanceOp = ("reserve", entity, reservation_id(user_id, key, print_), quantity,
                               now + RESERVATION_MS, user_id, key)  # fmt: skip

            wanted.setdefault(shard_index(entity, self.settings.shards), []).append((i, op))
        out: dict[int, AllowanceOp | str] = {}
        if not wanted:
            return out

        async def ask(shard: int, items: list[tuple[int, AllowanceOp]]) -> None:
            try:
                granted = await self._call(shard, self.catalog.version, [op for _, op in items])
            except Exception as exc:
                log.warning("allowance shard %d did not answer: %r", shard, exc)
                for i, _ in items:
                    out[i] = "unavailable"
                return
            for (i, op), answer in zip(items, granted, strict=True):
                if answer:  # the reservation's own deadline: the one to apply by
                    out[i] = (op[0], op[1], op[2], op[3], answer, op[5], op[6])
                else:
                    out[i] = ("refused", *op[1:])

        await asyncio.gather(*(ask(shard, items) for shard, items in wanted.items()))
        return out

    async def _settle(self, ops: list[AllowanceOp]) -> None:
        """Confirm or release reservations; what fails here the sweeper settles."""
        by_shard: dict[int, list[AllowanceOp]] = {}
        for op in ops:
            by_shard.setdefault(shard_index(op[1], self.settings.shards), []).append(op)
        for shard, items in by_shard.items():
            try:
                await self._call(shard, self.catalog.version, items)
            except Exception as exc:
                log.warning(
                    "could not settle %d reservations on shard %d: %r", len(items), shard, exc
                )

    def _surely_not_applied(self, user_id: str, request: ShardRequest) -> bool:
        """True when the user is resident and has never applied this key: only
        then may a refused request release its reservation at once."""
        state = self.users.get(user_id)
        key = scoped_key(request) if isinstance(request, Purchase | Redeem) else None
        return state is not None and key is not None and key not in state.keys

    async def _call_self(
        self, shard: int, catalog_version: int, ops: list[AllowanceOp]
    ) -> list[int]:
        return await asyncio.wait_for(self.apply_allowances(catalog_version, ops), 10)

    def _capacity(self, entity: str) -> int:
        kind, _, name = entity.partition(":")
        if kind == "stock":
            item = self.catalog.lookup(name)
            return item.stock if item is not None and item.stock is not None else 0
        promo = self.catalog.promos.get(name)
        return promo.max_uses if promo is not None else 0

    async def apply_allowances(self, catalog_version: int, ops: list[AllowanceOp]) -> list[int]:
        """Apply saga steps to allowances hosted here; answer once durable.

        Raises ``JournalError`` (the caller answers ``unavailable``) if the
        steps could not be made durable."""
        assert self._journal is not None and self._pool is not None
        if self._journal.fenced:
            raise JournalError("this shard has a newer owner")
        if catalog_version > self.catalog.version:
            await self._reload_catalog()
        await self._activate({op[1] for op in ops})
        now = _now_ms()
        records: list[JournalRecord] = []
        results: list[int] = []
        changed: set[str] = set()
        for op, entity, res, quantity, deadline, user, key in ops:
            held = self.allowances.get(entity)
            if held is None:
                results.append(0)
                continue
            if op == "reserve":
                ok, moved = allowances.reserve(
                    held.state, res, quantity, self._capacity(entity), deadline, user, key,
                    res.rpartition("/")[2],
                )  # fmt: skip
            elif op == "confirm":
                ok = moved = allowances.confirm(held.state, res)
            else:  # "release", or "abandon" by the sweeper (recorded as an outcome)
                ok = moved = allowances.release(held.state, res, deadline)
            if ok and op == "reserve":
                results.append(held.state.reservations[res].deadline)
            else:
                results.append(int(ok))
            if moved:
                held.version += 1
                body = allowance_encoder.encode((op, res, quantity, deadline, user, key))
                outcome = (res, deadline, "released") if op == "abandon" else None
                records.append(
                    JournalRecord(
                        entity, held.version, now, "allowance." + op, None, body, None, outcome
                    )
                )
                changed.add(entity)
        await self._journal.write(records)
        stocks = [e.partition(":")[2] for e in changed if e.startswith("stock:")]
        if stocks:
            self._background(self._announce_stock(stocks))
        return results

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
        held = self.allowances.get(allowance_id("stock", sku))
        item = self.catalog.lookup(sku)
        if item is None or item.stock is None:
            return None
        return item.stock if held is None else allowances.left(held.state, item.stock)

    async def _settle_left_behind(self) -> None:
        """Settle reservations a crash left behind, well after their deadline:
        confirm if the user's journal has the purchase, release if not."""
        while True:
            await asyncio.sleep(5)
            now = _now_ms()
            stale = [
                (entity, res, r)
                for entity, held in list(self.allowances.items())
                for res, r in held.state.reservations.items()
                if r.deadline + SETTLE_AFTER_MS < now
            ]
            if not stale:
                continue
            try:
                assert self._pool is not None
                found = await store.load_changes_by_key(
                    self._pool, [(r.user, "p:" + r.key) for _, _, r in stale]
                )
                prints = {
                    who: (decode_change(data).fingerprint or b"").hex()
                    for who, data in found.items()
                }
                ops: list[AllowanceOp] = [
                    ("confirm" if prints.get((r.user, "p:" + r.key)) == r.fingerprint
                     else "abandon", entity, res, r.quantity, r.deadline, r.user, r.key)
                    for entity, res, r in stale
                ]  # fmt: skip
                await self.apply_allowances(self.catalog.version, ops)
                log.info("settled %d reservations left behind", len(ops))
            except Exception as exc:
                log.warning("could not settle reservations left behind: %r", exc)
