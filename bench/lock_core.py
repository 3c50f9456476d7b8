"""The lock baseline: the BattleBucks purchase flow behind the Loadout gateway.

``python -m bench.lock_server`` serves with this ``Backend`` in place of the
actor core (``ShardRouter``), so ``loadout bench --baseline lock`` measures
the design Loadout replaces with only the core differing (same gateway,
codecs, rate limits, Redis pushes, PostgreSQL).  It is the benchmark's, not
the product's: it lives in ``bench/`` and creates its own ``lock_*`` tables
when it starts (``bench/lock_schema.py``).  It follows battlebucks-design.md
§4.3: every request is one database transaction on those tables.  A purchase

1. checks for an existing purchase with the same ``transaction_id`` (the
   idempotency key) and answers it again if there is one;
2. takes the wallet row with ``SELECT ... FOR UPDATE``;
3. validates (item active, price, holding cap, balance);
4. debits the wallet and bumps its version, writes the purchase row, the
   inventory row (upsert) and the ledger row;
5. commits, and only then publishes the ``inventory`` push to Redis, and answers.

``equip``/``unequip`` and ``grant`` are plain transactions that also take the
wallet row first (it carries the user's version, and one lock order means no
deadlocks); ``state``/``inspect`` are plain reads.  Every other request is
answered ``unavailable``: the baseline exists to be measured, not served.

Requests run concurrently over a bounded connection pool, as in a stateless
API server; the row lock, not the gateway, orders one user's requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg
import msgspec
import redis.asyncio as aioredis

from actors.catalog import Catalog
from actors.routing import user_channel
from bench.lock_schema import create_lock_tables
from persistence import store
from persistence.publisher import PushPublisher
from protocol.errors import ErrorCode, RequestError
from protocol.messages import (
    MAX_GEMS,
    Equip,
    Equipped,
    Error,
    Grant,
    Granted,
    Inspect,
    InventoryEntry,
    InventoryPush,
    ItemKind,
    ItemStatus,
    LoadoutPush,
    ProfileView,
    Purchase,
    Purchased,
    Reply,
    ServerMessage,
    State,
    StateReply,
    Unequip,
    Unequipped,
)
from server.batching import Answer, ShardBusy

__all__ = ["LockBackend"]

log = logging.getLogger("loadout.lock")

MAIN_PROFILE = "main"
MAX_HELD = 2**31 - 1


class LockBackend:
    """One transaction per request, wallet row taken ``FOR UPDATE``."""

    def __init__(
        self,
        database_url: str,
        redis: aioredis.Redis,
        catalog: Callable[[], Catalog],
        *,
        starting_balance: int = 0,
        pool_size: int = 24,
        max_pending: int = 100_000,
        push_queue: int = 10_000,
    ) -> None:
        self._database_url = database_url
        self._redis = redis
        self._catalog = catalog
        self._starting_balance = starting_balance
        self._pool_size = pool_size
        self._max_pending = max_pending
        self._pool: asyncpg.Pool | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._pushes = PushPublisher(redis, push_queue)
        self._encoder = msgspec.msgpack.Encoder()

    async def start(self) -> None:
        self._pool = await store.open_pool(
            self._database_url, min_size=self._pool_size, max_size=self._pool_size
        )
        async with self._pool.acquire() as con:
            await create_lock_tables(con)
        await self._pushes.start()

    # --------------------------------------------------------------- Backend

    def submit(self, user_id: str, request: object, reply: Answer) -> None:
        if len(self._pending) >= self._max_pending:
            raise ShardBusy(f"{len(self._pending)} requests waiting for the database")
        task = asyncio.get_running_loop().create_task(self._serve(user_id, request, reply))
        self._pending.add(task)
        self._idle.clear()
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if not self._pending:
            self._idle.set()

    async def drain(self) -> None:
        await self._idle.wait()

    async def close(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drain(), 20)
        await self._pushes.close()
        if self._pool is not None:
            await self._pool.close()

    # --------------------------------------------------------------- serving

    async def _serve(self, user_id: str, request: object, answer: Answer) -> None:
        rid = getattr(request, "rid", None)
        pushes: list[ServerMessage] = []
        try:
            reply = await self._handle(user_id, request, pushes)
            data = self._encoder.encode(reply)
        except RequestError as exc:
            data = self._error(rid, exc.code, exc.message)
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            log.warning("lock transaction for %s failed: %r", user_id, exc)
            data = self._error(rid, ErrorCode.UNAVAILABLE, "the database failed; retry")
        except asyncio.CancelledError:
            answer(self._error(rid, ErrorCode.UNAVAILABLE, "shutting down; retry"))
            raise
        except Exception:
            log.exception("bug in the lock baseline serving %s", type(request).__name__)
            data = self._error(rid, ErrorCode.INTERNAL, "internal error")
        if pushes:  # written to Redis before the answer, as the actor core does
            channel = user_channel(user_id)
            self._pushes.publish([(channel, self._encoder.encode(p)) for p in pushes])
        answer(data)

    async def _handle(self, user_id: str, request: object, pushes: list[ServerMessage]) -> Reply:
        assert self._pool is not None
        async with self._pool.acquire() as con:
            match request:
                case Purchase():
                    return await self._purchase(con, user_id, request, pushes)
                case Equip():
                    return await self._equip(con, user_id, request, pushes)
                case Unequip():
                    return await self._unequip(con, user_id, request, pushes)
                case Grant():
                    return await self._grant(con, user_id, request, pushes)
                case State() | Inspect():
                    return await self._state(con, user_id, request.rid)
        kind = type(request).__name__.lower()
        raise RequestError(
            ErrorCode.UNAVAILABLE, f"the lock baseline does not implement {kind!r} requests"
        )

    def _error(self, rid: str | int | None, code: ErrorCode, message: str) -> bytes:
        return self._encoder.encode(Error(rid=rid, code=code.value, message=message))

    async def _lock_wallet(self, con: asyncpg.Connection, user_id: str) -> tuple[int, int]:
        """Take the user's wallet row (creating it on first use): (balance, version)."""
        query = "SELECT balance, version FROM lock_wallets WHERE user_id = $1 FOR UPDATE"
        row = await con.fetchrow(query, user_id)
        if row is None:
            start = self._starting_balance
            created = await con.fetchval(
                "INSERT INTO lock_wallets (user_id, balance, version) VALUES ($1, $2, $3)"
                " ON CONFLICT DO NOTHING RETURNING user_id",
                user_id, start, 1 if start > 0 else 0,
            )  # fmt: skip
            if created is not None:
                await con.execute(
                    "INSERT INTO lock_profiles (user_id, profile) VALUES ($1, $2)",
                    user_id, MAIN_PROFILE,
                )  # fmt: skip
                if start > 0:
                    await con.execute(
                        "INSERT INTO lock_ledger (user_id, kind, amount, balance)"
                        " VALUES ($1, 'starting', $2, $2)",
                        user_id, start,
                    )  # fmt: skip
            row = await con.fetchrow(query, user_id)
        return row["balance"], row["version"]

    async def _purchase(
        self, con: asyncpg.Connection, user_id: str, request: Purchase, pushes: list[ServerMessage]
    ) -> Reply:
        async with con.transaction():
            # §4.3 "Idempotency Protection": an existing transaction_id answers again.
            seen = await con.fetchrow(
                "SELECT id, sku, quantity, unit_price, total, balance, version"
                " FROM lock_purchases WHERE user_id = $1 AND transaction_id = $2",
                user_id, request.key,
            )  # fmt: skip
            if seen is not None:
                return _replayed(request, seen)
            balance, version = await self._lock_wallet(con, user_id)
            item = self._catalog().items.get(request.sku)
            if item is None or item.status is not ItemStatus.ACTIVE:
                raise RequestError(ErrorCode.UNKNOWN_ITEM, f"{request.sku!r} is not for sale")
            if request.price != item.price:
                raise RequestError(
                    ErrorCode.PRICE_CHANGED, f"the price of {request.sku!r} is now {item.price}"
                )
            held = await con.fetchval(
                "SELECT quantity FROM lock_inventory WHERE user_id = $1 AND sku = $2",
                user_id, request.sku,
            )  # fmt: skip
            held = held or 0
            if not item.stackable and (request.quantity != 1 or held):
                raise RequestError(
                    ErrorCode.LIMIT_EXCEEDED,
                    f"{request.sku!r} is held once and bought one at a time",
                )
            cap = (item.max_quantity or MAX_HELD) if item.stackable else 1
            if held + request.quantity > cap:
                raise RequestError(
                    ErrorCode.LIMIT_EXCEEDED, f"you may hold at most {cap} of {request.sku!r}"
                )
            total = item.price * request.quantity
            if total > balance:
                raise RequestError(
                    ErrorCode.INSUFFICIENT_FUNDS, f"{total} gems needed, {balance} held"
                )
            balance, version = balance - total, version + 1
            await con.execute(
                "UPDATE lock_wallets SET balance = $2, version = $3, updated_at = now()"
                " WHERE user_id = $1",
                user_id, balance, version,
            )  # fmt: skip
            purchase = await con.fetchval(
                "INSERT INTO lock_purchases (user_id, transaction_id, sku, quantity, unit_price,"
                " total, balance, version) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
                user_id, request.key, request.sku, request.quantity, item.price, total,
                balance, version,
            )  # fmt: skip
            quantity = await con.fetchval(
                "INSERT INTO lock_inventory (user_id, sku, quantity) VALUES ($1, $2, $3)"
                " ON CONFLICT (user_id, sku) DO UPDATE"
                " SET quantity = lock_inventory.quantity + excluded.quantity RETURNING quantity",
                user_id, request.sku, request.quantity,
            )  # fmt: skip
            await con.execute(
                "INSERT INTO lock_ledger (user_id, kind, amount, balance, sku, quantity, key)"
                " VALUES ($1, 'purchase', $2, $3, $4, $5, $6)",
                user_id, -total, balance, request.sku, request.quantity, request.key,
            )  # fmt: skip
        pushes.append(InventoryPush(version, balance, [InventoryEntry(request.sku, quantity)]))
        return Purchased(
            rid=request.rid, purchase=f"pur_{purchase}", sku=request.sku,
            quantity=request.quantity, total=total, balance=balance, version=version,
        )  # fmt: skip

    async def _grant(
        self, con: asyncpg.Connection, user_id: str, request: Grant, pushes: list[ServerMessage]
    ) -> Reply:
        async with con.transaction():
            seen = await con.fetchrow(
                "SELECT amount, balance, version FROM lock_grants WHERE user_id = $1 AND key = $2",
                user_id, request.key,
            )  # fmt: skip
            if seen is not None:
                if seen["amount"] != request.amount:
                    raise RequestError(
                        ErrorCode.IDEMPOTENCY_CONFLICT, "this key was used for a different request"
                    )
                return Granted(
                    rid=request.rid, user=user_id, balance=seen["balance"], version=seen["version"]
                )
            balance, version = await self._lock_wallet(con, user_id)
            if balance + request.amount > MAX_GEMS:
                raise RequestError(ErrorCode.LIMIT_EXCEEDED, "the balance would exceed its cap")
            balance, version = balance + request.amount, version + 1
            await con.execute(
                "UPDATE lock_wallets SET balance = $2, version = $3, updated_at = now()"
                " WHERE user_id = $1",
                user_id, balance, version,
            )  # fmt: skip
            await con.execute(
                "INSERT INTO lock_grants (user_id, key, amount, balance, version)"
                " VALUES ($1, $2, $3, $4, $5)",
                user_id, request.key, request.amount, balance, version,
            )  # fmt: skip
            await con.execute(
                "INSERT INTO lock_ledger (user_id, kind, amount, balance, key)"
                " VALUES ($1, 'grant', $2, $3, $4)",
                user_id, request.amount, balance, request.key,
            )  # fmt: skip
        pushes.append(InventoryPush(version, balance, []))
        return Granted(rid=request.rid, user=user_id, balance=balance, version=version)

    async def _profile_game(
        self, con: asyncpg.Connection, user_id: str, profile: str
    ) -> str | None:
        row = await con.fetchrow(
            "SELECT game FROM lock_profiles WHERE user_id = $1 AND profile = $2", user_id, profile
        )
        if row is None:
            raise RequestError(ErrorCode.UNKNOWN_PROFILE, f"no profile {profile!r}")
        game: str | None = row["game"]
        return game

    async def _equipped(
        self, con: asyncpg.Connection, user_id: str, profile: str
    ) -> dict[str, str]:
        rows = await con.fetch(
            "SELECT slot, sku FROM lock_equipped WHERE user_id = $1 AND profile = $2",
            user_id, profile,
        )  # fmt: skip
        return {r["slot"]: r["sku"] for r in rows}

    async def _equip(
        self, con: asyncpg.Connection, user_id: str, request: Equip, pushes: list[ServerMessage]
    ) -> Reply:
        async with con.transaction():
            _, version = await self._lock_wallet(con, user_id)
            game = await self._profile_game(con, user_id, request.profile)
            held = await con.fetchval(
                "SELECT quantity FROM lock_inventory WHERE user_id = $1 AND sku = $2",
                user_id, request.sku,
            )  # fmt: skip
            if not held:
                raise RequestError(ErrorCode.NOT_OWNED, f"you do not hold {request.sku!r}")
            item = self._catalog().lookup(request.sku)
            if item is None:
                raise RequestError(ErrorCode.UNKNOWN_ITEM, f"no item {request.sku!r}")
            if item.kind is ItemKind.CONSUMABLE:
                raise RequestError(ErrorCode.INCOMPATIBLE, "consumables cannot be equipped")
            if item.slot != request.slot:
                where = f"slot {item.slot!r}" if item.slot else "no slot"
                raise RequestError(ErrorCode.INCOMPATIBLE, f"{request.sku!r} goes in {where}")
            if item.game is not None and item.game != game:
                raise RequestError(
                    ErrorCode.INCOMPATIBLE, f"{request.sku!r} is for game {item.game!r} only"
                )
            equipped = await self._equipped(con, user_id, request.profile)
            if equipped.get(request.slot) != request.sku:
                version += 1
                await con.execute(
                    "INSERT INTO lock_equipped (user_id, profile, slot, sku)"
                    " VALUES ($1, $2, $3, $4)"
                    " ON CONFLICT (user_id, profile, slot) DO UPDATE"
                    " SET sku = excluded.sku, equipped_at = now()",
                    user_id, request.profile, request.slot, request.sku,
                )  # fmt: skip
                await _bump(con, user_id, version)
                equipped[request.slot] = request.sku
                pushes.append(LoadoutPush(version, request.profile, game, equipped))
        return Equipped(
            rid=request.rid, profile=request.profile, slot=request.slot, sku=request.sku,
            version=version,
        )  # fmt: skip

    async def _unequip(
        self, con: asyncpg.Connection, user_id: str, request: Unequip, pushes: list[ServerMessage]
    ) -> Reply:
        async with con.transaction():
            _, version = await self._lock_wallet(con, user_id)
            game = await self._profile_game(con, user_id, request.profile)
            removed = await con.fetchval(
                "DELETE FROM lock_equipped WHERE user_id = $1 AND profile = $2 AND slot = $3"
                " RETURNING sku",
                user_id, request.profile, request.slot,
            )  # fmt: skip
            if removed is not None:
                version += 1
                await _bump(con, user_id, version)
                equipped = await self._equipped(con, user_id, request.profile)
                pushes.append(LoadoutPush(version, request.profile, game, equipped))
        return Unequipped(
            rid=request.rid, profile=request.profile, slot=request.slot, version=version
        )

    async def _state(
        self, con: asyncpg.Connection, user_id: str, rid: str | int | None
    ) -> StateReply:
        async with con.transaction(isolation="repeatable_read", readonly=True):
            wallet = await con.fetchrow(
                "SELECT balance, version FROM lock_wallets WHERE user_id = $1", user_id
            )
            if wallet is None:  # never seen: what a new user looks like
                start = self._starting_balance
                return StateReply(
                    rid=rid, user=user_id, version=1 if start > 0 else 0, balance=start,
                    inventory=[], profiles=[ProfileView(MAIN_PROFILE, None, {})],
                )  # fmt: skip
            inventory = await con.fetch(
                "SELECT sku, quantity FROM lock_inventory WHERE user_id = $1 AND quantity > 0"
                " ORDER BY sku",
                user_id,
            )
            profiles = await con.fetch(
                "SELECT profile, game FROM lock_profiles WHERE user_id = $1 ORDER BY profile",
                user_id,
            )
            equipped = await con.fetch(
                "SELECT profile, slot, sku FROM lock_equipped WHERE user_id = $1", user_id
            )
        slots: dict[str, dict[str, str]] = {}
        for row in equipped:
            slots.setdefault(row["profile"], {})[row["slot"]] = row["sku"]
        return StateReply(
            rid=rid,
            user=user_id,
            version=wallet["version"],
            balance=wallet["balance"],
            inventory=[InventoryEntry(r["sku"], r["quantity"]) for r in inventory],
            profiles=[
                ProfileView(r["profile"], r["game"], slots.get(r["profile"], {})) for r in profiles
            ],
        )


async def _bump(con: asyncpg.Connection, user_id: str, version: int) -> None:
    await con.execute(
        "UPDATE lock_wallets SET version = $2, updated_at = now() WHERE user_id = $1",
        user_id, version,
    )  # fmt: skip


def _replayed(request: Purchase, seen: asyncpg.Record) -> Reply:
    if (seen["sku"], seen["quantity"], seen["unit_price"]) != (
        request.sku,
        request.quantity,
        request.price,
    ):
        raise RequestError(
            ErrorCode.IDEMPOTENCY_CONFLICT, "this key was used for a different request"
        )
    return Purchased(
        rid=request.rid, purchase=f"pur_{seen['id']}", sku=seen["sku"],
        quantity=seen["quantity"], total=seen["total"], balance=seen["balance"],
        version=seen["version"],
    )  # fmt: skip
