"""Publishing pushes to Redis: in order, batched, bounded.

The actor core's shards and the lock baseline both publish a user's pushes
once the change is durable, one Redis channel per user (DESIGN.md step 5).
Pushes are best effort: when Redis is down or the queue is full they are
dropped and counted, never the state (clients resync with ``state``).

A batch of pushes goes to Redis as one call of a small Lua script that
publishes each: one command and one reply, where a pipeline of PUBLISH
commands had the client pack and parse one of each per push.
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
MAX_BATCH = 5000

#: ARGV holds channel, payload, channel, payload...
_PUBLISH_ALL = """
for i = 1, #ARGV, 2 do
    redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
end
return #ARGV / 2
"""


class PushPublisher:
    def __init__(self, redis: aioredis.Redis, max_queue: int = 10_000) -> None:
        self._redis = redis
        self._queue: asyncio.Queue[Pushes] = asyncio.Queue(max_queue)
        self._task: asyncio.Task[None] | None = None
        self._publish_all = redis.register_script(_PUBLISH_ALL)
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
                while not self._queue.empty() and len(pushes) < MAX_BATCH:
                    pushes.extend(self._queue.get_nowait())
                    self._queue.task_done()
                await self._publish_all(args=[part for push in pushes for part in push])
            except Exception as exc:  # Redis down: pushes are lost, state is not
                self.dropped += len(pushes)
                log.warning("could not publish %d pushes: %r", len(pushes), exc)
            finally:
                self._queue.task_done()
