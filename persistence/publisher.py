"""Publishing pushes to Redis: in order, pipelined, bounded.

The actor core's shards and the lock baseline both publish a user's pushes
once the change is durable, one Redis channel per user (DESIGN.md step 5).
Pushes are best effort: when Redis is down or the queue is full they are
dropped and counted, never the state (clients resync with ``state``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis

__all__ = ["PushPublisher"]

log = logging.getLogger("loadout.pushes")

#: (channel, payload) pairs published together.
Pushes = list[tuple[str, bytes]]
CLOSE_SECONDS = 5.0


class PushPublisher:
    def __init__(self, redis: aioredis.Redis, max_queue: int = 10_000) -> None:
        self._redis = redis
        self._queue: asyncio.Queue[Pushes] = asyncio.Queue(max_queue)
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pushes")

    def publish(self, pushes: Pushes) -> None:
        if not pushes:
            return
        try:
            self._queue.put_nowait(pushes)
        except asyncio.QueueFull:
            self.dropped += len(pushes)
            log.warning("push queue full: dropped %d pushes", len(pushes))

    async def close(self) -> None:
        """Publish what is queued (for at most a few seconds), then stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), CLOSE_SECONDS)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            pushes = await self._queue.get()
            try:
                while not self._queue.empty() and len(pushes) < 5000:
                    pushes.extend(self._queue.get_nowait())
                    self._queue.task_done()
                async with self._redis.pipeline(transaction=False) as pipe:
                    for channel, payload in pushes:
                        pipe.publish(channel, payload)
                    await pipe.execute()
            except Exception as exc:  # Redis down: pushes are lost, state is not
                self.dropped += len(pushes)
                log.warning("could not publish %d pushes: %r", len(pushes), exc)
            finally:
                self._queue.task_done()
