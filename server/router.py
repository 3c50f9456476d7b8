"""The gateway's routing: each request goes to the shard the partition map
gives its user's partition (PROTOCOL.md §13), on that shard's batcher.

The map is read from PostgreSQL at start and again when it changes (a notice
on Redis, a poll, or a shard answering ``MOVED``).  A shard answers ``MOVED``
for a request it did not apply because it does not serve the partition (the
partition moved, or is being handed over); the router then *parks* the
partition: its moved requests and any new ones wait, in the order they were
sent, until the map gives the partition to another shard, and go there.  So
a move shows to clients as a pause, not as an error, unless it outlasts
``MOVE_WAIT`` (then ``unavailable``: nothing was applied, retry).

Order: a batcher answers in the order it was sent, so the parked requests
are released only once the old shard has answered everything sent to it
before the partition was parked (those may come back ``MOVED`` too, and go
first).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from prometheus_client import Histogram

from actors.partitions import PartitionMap, partition_of
from actors.shard.link import unavailable
from actors.shard.records import BatchItem, ShardRequest
from server.batching import Answer, ShardBatcher, ShardBusy

__all__ = ["MOVE_WAIT", "ShardRouter"]

log = logging.getLogger("loadout.router")

#: How long requests for a moving partition wait for the map to move it.
MOVE_WAIT = 3.0
#: How often the router reads the map's epoch while nothing tells it of a change.
MAP_POLL = 2.0
_MOVING = "the user's partition is moving between shards; retry with the same key"


class _Retry:
    """A re-sent request's reply, remembering where it was parked."""

    __slots__ = ("answer", "attempt")

    def __init__(self, answer: Answer, attempt: int) -> None:
        self.answer, self.attempt = answer, attempt

    def __call__(self, data: bytes) -> None:
        self.answer(data)


class _Parked:
    """A partition whose requests wait for the map to move it."""

    __slots__ = ("later", "mark", "moved", "shard", "since")

    def __init__(self, shard: int, mark: int) -> None:
        self.shard = shard  # the shard that said MOVED
        self.mark = mark  # requests sent to it before parking: wait for their answers
        self.moved: list[tuple[BatchItem, Answer]] = []
        self.later: list[tuple[BatchItem, Answer]] = []
        self.since = time.monotonic()


class ShardRouter:
    """The actor core: routes by the partition map, follows it, re-routes moves."""

    def __init__(
        self,
        first: PartitionMap,
        make_batcher: Callable[[int], ShardBatcher],
        load_map: Callable[[], Awaitable[PartitionMap | None]],
        pauses: Histogram | None = None,
    ) -> None:
        self.map = first
        self._pauses = pauses
        self._make_batcher = make_batcher
        self._load_map = load_map
        self._batchers: dict[int, ShardBatcher] = {}
        self._parked: dict[int, _Parked] = {}
        self._reloading: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._follow: asyncio.Task[None] | None = None
        self._closed = False
        #: Set while no partition is parked.
        self._calm = asyncio.Event()
        self._calm.set()

    @property
    def batchers(self) -> list[ShardBatcher]:
        """The batchers of the shards the map routes to (readiness)."""
        return [self._batcher(s) for s in self.map.shards()]

    async def start(self, wait: float | None = None) -> None:
        await asyncio.gather(*(b.start(wait) for b in self.batchers))
        self._follow = asyncio.get_running_loop().create_task(self._poll(), name="map-poll")

    def submit(self, user_id: str, request: ShardRequest, reply: Answer) -> None:
        partition = partition_of(user_id, self.map.partitions)
        parked = self._parked.get(partition)
        if parked is not None:
            parked.later.append(((user_id, request), reply))
            return
        self._batcher(self.map.owners[partition]).submit(user_id, request, reply)

    async def drain(self) -> None:
        await self._calm.wait()
        await asyncio.gather(*(b.drain() for b in self._batchers.values()))

    async def close(self) -> None:
        self._closed = True
        if self._follow is not None:
            self._follow.cancel()
        for task in list(self._tasks):
            task.cancel()
        for parked in self._parked.values():
            for (_, request), reply in parked.moved + parked.later:
                reply(unavailable(request.rid, "server shutting down; retry"))
        self._parked.clear()
        self._calm.set()
        for batcher in self._batchers.values():
            await batcher.close()

    # ------------------------------------------------------------ the map

    def _batcher(self, shard: int) -> ShardBatcher:
        batcher = self._batchers.get(shard)
        if batcher is None:
            batcher = self._batchers[shard] = self._make_batcher(shard)
            batcher.on_moved = self._moved
            batcher.map_epoch = lambda: self.map.epoch
            batcher.connect()
        return batcher

    async def refresh(self) -> None:
        """Read the map again (one read at a time; callers share it)."""
        if self._reloading is None:
            self._reloading = asyncio.ensure_future(self._reload())
            self._reloading.add_done_callback(lambda _: setattr(self, "_reloading", None))
        await asyncio.shield(self._reloading)

    async def _reload(self) -> None:
        new = await self._load_map()
        if new is None or new.epoch <= self.map.epoch:
            return
        old, self.map = self.map, new
        log.info("partition map epoch %d (%d shards)", new.epoch, len(new.shards()))
        for shard in set(old.shards()) - set(new.shards()):
            # No partition left there: let what it holds come back, then close.
            self._spawn(self._retire(shard))

    async def _retire(self, shard: int) -> None:
        batcher = self._batchers.get(shard)
        if batcher is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(batcher.drain(), 30)
        if shard not in self.map.owners and self._batchers.get(shard) is batcher:
            del self._batchers[shard]
            await batcher.close()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(MAP_POLL)
            try:
                await self.refresh()
            except Exception as exc:
                log.warning("could not read the partition map: %r", exc)

    # ------------------------------------------------------------ moves

    def _moved(self, shard: int, item: BatchItem, reply: Answer) -> None:
        """A shard did not apply this request: its partition is not there."""
        if self._closed:
            return reply(unavailable(item[1].rid, "server shutting down; retry"))
        partition = partition_of(item[0], self.map.partitions)
        parked = self._parked.get(partition)
        if parked is None:
            batcher = self._batchers[shard]
            parked = self._parked[partition] = _Parked(shard, batcher.submitted)
            self._calm.clear()
            self._spawn(self._reroute(partition, parked))
        parked.moved.append((item, reply))

    async def _reroute(self, partition: int, parked: _Parked) -> None:
        delay = 0.02
        try:
            while True:
                old = self._batchers.get(parked.shard)
                settled = old is None or old.answered >= parked.mark
                if settled:
                    with contextlib.suppress(Exception):
                        await self.refresh()
                    if self.map.owners[partition] != parked.shard:
                        break
                if time.monotonic() - parked.since > MOVE_WAIT:
                    log.warning("partition %d: no new owner in %.1f s", partition, MOVE_WAIT)
                    return self._give_up(partition, parked)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.25)
        except asyncio.CancelledError:
            return self._give_up(partition, parked)
        self._unpark(partition)
        if self._pauses is not None:
            self._pauses.observe(time.monotonic() - parked.since)
        log.info(
            "partition %d: %d requests follow it from shard %d to shard %d after %.0f ms",
            partition, len(parked.moved) + len(parked.later), parked.shard,
            self.map.owners[partition], 1e3 * (time.monotonic() - parked.since),
        )  # fmt: skip
        for (user_id, request), reply in parked.moved + parked.later:
            attempt = reply.attempt + 1 if isinstance(reply, _Retry) else 1
            if attempt > 3:
                reply(unavailable(request.rid, _MOVING))
                continue
            answer = reply.answer if isinstance(reply, _Retry) else reply
            try:
                self.submit(user_id, request, _Retry(answer, attempt))
            except ShardBusy:
                answer(unavailable(request.rid, "the shard is busy; retry"))

    def _unpark(self, partition: int) -> None:
        self._parked.pop(partition, None)
        if not self._parked:
            self._calm.set()

    def _give_up(self, partition: int, parked: _Parked) -> None:
        self._unpark(partition)
        for (_, request), reply in parked.moved + parked.later:
            reply(unavailable(request.rid, _MOVING))

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
