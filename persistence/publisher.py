"""Publishing pushes to Redis: in order, batched, bounded.

The actor core's shards and the lock baseline both publish a user's pushes
once the change is durable, one Redis channel per user (DESIGN.md step 5).
Pushes are best effort: when Redis is down or the queue is full they are
dropped and counted, never the state (clients resync with ``state``).

A batch of pushes goes to Redis as one call of a small Lua script that
publishes each: one command and one reply, where a pipeline of PUBLISH
commands had the client pack and parse one of each per push.

``publish`` returns a future that is done once Redis has the pushes (or they
were dropped).  Callers wait for it, briefly, before they answer: then a
connection opened after the answer cannot receive the change's push late,
as a push about something that happened before it was open.
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
#: How long an answer waits for its pushes to reach Redis (best effort).
PUBLISH_WAIT = 1.0

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
        self._queue: asyncio.Queue[tuple[Pushes, asyncio.Future[None]]] = asyncio.Queue(max_queue)
        self._task: asyncio.Task[None] | None = None
        self._publish_all = redis.register_script(_PUBLISH_ALL)
        self.dropped = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pushes")

    def publish(self, pushes: Pushes) -> asyncio.Future[None]:
        """Queue pushes; the future is done once Redis has them or they were dropped."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not pushes:
            done.set_result(None)
            return done
        try:
            self._queue.put_nowait((pushes, done))
        except asyncio.QueueFull:
            self.dropped += len(pushes)
            log.warning("push queue full: dropped %d pushes", len(pushes))
            done.set_result(None)
        return done

    async def publish_and_wait(self, pushes: Pushes) -> None:
        """Publish, and wait (at most ``PUBLISH_WAIT``) until Redis has them."""
        done = self.publish(pushes)
        if not done.done():
            await asyncio.wait((done,), timeout=PUBLISH_WAIT)

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
            first, done = await self._queue.get()
            pushes, waiting = list(first), [done]
            try:
                while not self._queue.empty() and len(pushes) < MAX_BATCH:
                    more, done = self._queue.get_nowait()
                    pushes.extend(more)
                    waiting.append(done)
                    self._queue.task_done()
                await self._publish_all(args=[part for push in pushes for part in push])
            except Exception as exc:  # Redis down: pushes are lost, state is not
                self.dropped += len(pushes)
                log.warning("could not publish %d pushes: %r", len(pushes), exc)
            finally:
                self._queue.task_done()
                for done in waiting:
                    if not done.done():
                        done.set_result(None)
