"""A Redis pub/sub connection read with hiredis, below redis-py's per-message layer.

redis-py's ``PubSub`` hands every message through several coroutine layers
(``listen``, ``get_message``, ``parse_response``, the retry wrapper, the
parser).  At 5,000 requests/s those layers cost the gateway about a tenth of
its CPU, one push message at a time (BENCHMARKS.md, "Third session").  This
subscriber speaks the same protocol on a connection of our own
(``persistence/resp.py``) and is called back once per message.

When the connection drops it reconnects with a growing delay and subscribes
again to every channel it had; messages published meanwhile are lost, as
with redis-py (pushes are best effort: clients resync with ``state``).
Subscribing while Redis is down succeeds at once (the channel is taken on
reconnection), so a client connecting meanwhile is served, without pushes
until Redis is back.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from persistence.resp import OnMessage, RespConnection, connect

__all__ = ["Subscriber"]

log = logging.getLogger("loadout.pushes")


class Subscriber:
    """Subscribes to channels and calls ``on_message`` for what is published."""

    def __init__(self, redis: aioredis.Redis, on_message: OnMessage) -> None:
        self._redis = redis
        self._on_message = on_message
        self._channels: set[bytes] = set()
        self._connection: RespConnection | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        await self._connect()

    async def close(self) -> None:
        self._closed = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        if self._connection is not None and self._connection.transport is not None:
            self._connection.transport.close()

    async def subscribe(self, *channels: str) -> None:
        """Returns once Redis has confirmed every channel."""
        wanted = [c.encode() for c in channels]
        self._channels.update(wanted)
        await self._send(b"SUBSCRIBE", wanted)

    async def unsubscribe(self, *channels: str) -> None:
        unwanted = [c.encode() for c in channels]
        self._channels.difference_update(unwanted)
        await self._send(b"UNSUBSCRIBE", unwanted)

    async def _send(self, command: bytes, channels: list[bytes]) -> None:
        """Send and wait for Redis's confirmations.  While Redis is down this
        returns at once: the reconnection subscribes to every channel wanted
        then, and nothing can be published meanwhile for a subscriber to miss."""
        connection = self._connection
        if not channels or connection is None:
            return
        try:
            await asyncio.gather(*connection.send(command, *channels, replies=len(channels)))
        except ConnectionError:
            if connection is self._connection:
                raise  # Redis refused the command on a live connection
            # Lost meanwhile: the reconnection (re)subscribes.

    async def _connect(self) -> None:
        connection = await connect(self._redis, self._on_message, self._lost)
        try:
            if self._channels:
                channels = list(self._channels)
                replies = connection.send(b"SUBSCRIBE", *channels, replies=len(channels))
                await asyncio.wait_for(asyncio.gather(*replies), 10)
        except BaseException:
            connection.close()
            raise
        self._connection = connection

    def _lost(self, connection: RespConnection) -> None:
        if connection is not self._connection:
            return
        self._connection = None
        if not self._closed:
            log.error("push listener lost Redis; reconnecting")
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.1
        while not self._closed:
            try:
                await self._connect()
            except (OSError, ConnectionError, TimeoutError) as exc:
                log.error("push listener cannot reach Redis: %r; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            else:
                log.info("push listener reconnected to Redis (%d channels)", len(self._channels))
                return
