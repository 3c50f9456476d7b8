"""Publishing pushes to Redis: in order, at once, bounded.

The actor core's shards and the lock baseline both publish a user's pushes
once the change is durable, one Redis channel per user (DESIGN.md step 5).
Pushes are best effort: when Redis is down or too many publishes wait for
Redis's reply, they are dropped and counted, never the state (clients
resync with ``state``).

A batch of pushes goes to Redis as one call of a small Lua script that
publishes each: one command and one reply.  ``publish`` writes that command
to the socket before it returns (``persistence/resp.py``), so a caller that
answers its client afterwards has already handed the pushes to Redis: a
connection the client opens after the answer subscribes after them, and
cannot get a push about a change made before it was open.  Nobody needs to
wait for Redis's reply; the future ``publish`` returns tells when it came.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis

from persistence.resp import RespConnection, connect

__all__ = ["PushPublisher"]

log = logging.getLogger("loadout.pushes")

#: (channel, payload) pairs published together.
Pushes = list[tuple[str, bytes]]
CLOSE_SECONDS = 5.0

#: ARGV holds channel, payload, channel, payload...
_PUBLISH_ALL = b"""
for i = 1, #ARGV, 2 do
    redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
end
return #ARGV / 2
"""


class PushPublisher:
    def __init__(self, redis: aioredis.Redis, max_queue: int = 10_000) -> None:
        self._redis = redis
        self._max_waiting = max_queue  # publishes written but not yet answered
        self._connection: RespConnection | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._waiting: set[asyncio.Future[object]] = set()
        self._closed = False
        self.dropped = 0

    async def start(self) -> None:
        """Connect; if Redis cannot be reached, go on and keep trying."""
        try:
            self._connection = await asyncio.wait_for(connect(self._redis, None, self._lost), 10)
        except (OSError, ConnectionError, TimeoutError) as exc:
            log.warning("publisher cannot reach Redis: %r; pushes are dropped until it can", exc)
            self._connect_soon()

    def publish(self, pushes: Pushes) -> asyncio.Future[None]:
        """Write the pushes to Redis now; the future is done once Redis has
        answered, or they were dropped."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not pushes:
            done.set_result(None)
            return done
        connection = self._connection
        if connection is None or not connection.open or len(self._waiting) >= self._max_waiting:
            why = "Redis is not connected" if len(self._waiting) < self._max_waiting else "backlog"
            self._drop(len(pushes), why)
            done.set_result(None)
            self._connect_soon()
            return done
        args = [part for channel, push in pushes for part in (channel.encode(), push)]
        (reply,) = connection.send(b"EVAL", _PUBLISH_ALL, b"0", *args)
        self._waiting.add(reply)

        def answered(future: asyncio.Future[object]) -> None:
            self._waiting.discard(future)
            if future.exception() is not None:
                self._drop(len(pushes), repr(future.exception()))
            done.set_result(None)

        reply.add_done_callback(answered)
        return done

    async def close(self) -> None:
        """Wait (a few seconds at most) for Redis to answer what was written, then stop."""
        self._closed = True
        if self._waiting:
            await asyncio.wait(set(self._waiting), timeout=CLOSE_SECONDS)
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connecting
        if self._connection is not None:
            self._connection.close()

    def _drop(self, count: int, why: str) -> None:
        self.dropped += count
        log.warning("dropped %d pushes: %s", count, why)

    def _connect_soon(self) -> None:
        if self._closed or (self._connecting is not None and not self._connecting.done()):
            return
        self._connecting = asyncio.get_running_loop().create_task(self._connect(), name="pushes")

    async def _connect(self) -> None:
        delay = 0.1
        while not self._closed:
            try:
                self._connection = await connect(self._redis, None, self._lost)
                return
            except (OSError, ConnectionError, TimeoutError) as exc:
                log.warning("publisher cannot reach Redis: %r; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _lost(self, connection: RespConnection) -> None:
        if connection is self._connection:
            self._connection = None
            if not self._closed:
                log.warning("publisher lost Redis; reconnecting")
                self._connect_soon()
