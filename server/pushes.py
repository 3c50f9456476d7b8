"""Push fan-out: Redis pub/sub, one channel per user (DESIGN.md step 5).

Shards publish a user's pushes to ``loadout:user:<id>`` once the change is
durable; every gateway subscribes to the channels of the users it has
connections for and forwards what arrives.  The catalog channel announces
new catalog versions.  Messages are read below redis-py (``server/subscriber.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import msgspec
import redis.asyncio as aioredis

from actors.routing import catalog_channel, map_channel, stock_channel, user_channel
from server.subscriber import Subscriber

__all__ = ["PushFanout"]

log = logging.getLogger("loadout.pushes")

_USER_PREFIX = user_channel("").encode()
_STOCK = stock_channel().encode()
_CATALOG = catalog_channel().encode()
_MAP = map_channel().encode()
_stock = msgspec.msgpack.Decoder(tuple[str, int])
SUBSCRIBE_TIMEOUT = 5.0


class PushFanout:
    def __init__(
        self,
        redis: aioredis.Redis,
        deliver: Callable[[str, bytes], None],
        catalog_changed: Callable[[int], Awaitable[None]],
        stock_changed: Callable[[str, int], None] = lambda sku, left: None,
        map_changed: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._stock_changed = stock_changed
        self._map_changed = map_changed
        self._redis = redis
        self._subscriber = Subscriber(redis, self._on_message)
        self._deliver = deliver
        self._catalog_changed = catalog_changed
        self._users: Counter[str] = Counter()
        self._changes: asyncio.Queue[tuple[bool, str]] = asyncio.Queue()
        self._subscribed: dict[str, asyncio.Future[None]] = {}
        self._catalog_tasks: set[asyncio.Task[None]] = set()
        self._changer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._subscriber.start()
        await self._subscriber.subscribe(catalog_channel(), stock_channel(), map_channel())
        loop = asyncio.get_running_loop()
        self._changer = loop.create_task(self._apply_changes(), name="push-subscriptions")

    async def close(self) -> None:
        if self._changer is not None:
            self._changer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._changer
        await self._subscriber.close()

    async def watch(self, user_id: str) -> None:
        """A connection of this user opened here: returns once the user's
        channel is subscribed, so no push to this connection can be missed."""
        await asyncio.wait_for(asyncio.shield(self.subscribe(user_id)), SUBSCRIBE_TIMEOUT)

    def subscribe(self, user_id: str) -> asyncio.Future[None]:
        """Count one more interest in the user's pushes, at once (an ``unwatch``
        balances it, whatever becomes of the future); the future is done once
        the user's channel is subscribed."""
        self._users[user_id] += 1
        ready = self._subscribed.get(user_id)
        if ready is None:
            ready = self._subscribed[user_id] = asyncio.get_running_loop().create_future()
            self._changes.put_nowait((True, user_id))
        return ready

    def unwatch(self, user_id: str) -> None:
        self._users[user_id] -= 1
        if self._users[user_id] <= 0:
            del self._users[user_id]
            self._subscribed.pop(user_id, None)
            self._changes.put_nowait((False, user_id))

    async def _apply_changes(self) -> None:
        """Subscribe and unsubscribe in order, grouping what piled up."""
        while True:
            subscribe, user = await self._changes.get()
            batch = [(subscribe, user)]
            while not self._changes.empty():
                batch.append(self._changes.get_nowait())
            wanted: dict[str, bool] = {}
            for subscribe, user in batch:
                wanted[user] = subscribe
            add = [user_channel(u) for u, on in wanted.items() if on and u in self._users]
            drop = [user_channel(u) for u, on in wanted.items() if not on and u not in self._users]
            try:
                if add:
                    await self._subscriber.subscribe(*add)
                if drop:
                    await self._subscriber.unsubscribe(*drop)
            except Exception as exc:
                log.error("could not change push subscriptions: %r", exc)
                for user, on in wanted.items():
                    ready = self._subscribed.pop(user, None) if on else None
                    if ready is not None and not ready.done():
                        ready.set_exception(ConnectionError("push subscription failed"))
                continue
            for user, on in wanted.items():
                ready = self._subscribed.get(user) if on else None
                if ready is not None and not ready.done():
                    ready.set_result(None)

    def _on_message(self, channel: bytes, data: bytes) -> None:
        if channel.startswith(_USER_PREFIX):
            self._deliver(channel[len(_USER_PREFIX) :].decode(), data)
        elif channel == _STOCK:
            sku, left = _stock.decode(data)
            self._stock_changed(sku, left)
        elif channel == _CATALOG:
            self._spawn(self._on_catalog(int(data)))
        elif channel == _MAP and self._map_changed is not None:
            self._spawn(self._on_map())

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._catalog_tasks.add(task)
        task.add_done_callback(self._catalog_tasks.discard)

    async def _on_map(self) -> None:
        assert self._map_changed is not None
        try:
            await self._map_changed()
        except Exception as exc:
            log.warning("could not read the partition map: %r", exc)

    async def _on_catalog(self, version: int) -> None:
        try:
            await self._catalog_changed(version)
        except Exception:
            log.exception("could not load catalog version %d", version)
