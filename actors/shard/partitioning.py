"""A shard host's partitions (PROTOCOL.md §13): following the partition map
and handing partitions over.

``Partitions`` is a collaborator of ``ShardHost``.  It reads the map at
start, again when a gateway's batch carries a newer epoch or a flush rejects
entities, and every ``MAP_POLL_SECONDS``; partitions gained start their due
expiries and stock announcements, partitions lost without a hand-over drop
their entities (what memory holds of them may be stale).  ``release`` is the
old owner's part of a hand-over: stop serving, wait for the work in
progress (``applying``), flush, forget.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import asyncpg

from actors.partitions import PartitionMap
from actors.shard.coordinator import SagaCoordinator
from actors.shard.expiry import ExpiryScheduler
from actors.shard.ownership import Ownership
from actors.shard.residents import Residents
from persistence import cluster
from persistence.journal import Journal

__all__ = ["MAP_POLL_SECONDS", "Partitions"]

log = logging.getLogger("loadout.shard")

#: How often a shard reads the map's epoch (batches carry the gateways').
MAP_POLL_SECONDS = 2.0


class Partitions:
    def __init__(
        self,
        ownership: Ownership,
        residents: Residents,
        expiry: ExpiryScheduler,
        saga: SagaCoordinator,
        background: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self.ownership = ownership
        self._residents = residents
        self._expiry = expiry
        self._saga = saga
        self._background = background
        self._pool: asyncpg.Pool | None = None
        self._journal: Journal | None = None
        #: Batches, saga steps and expiries applying now (a hand-over waits for them).
        self._busy: set[asyncio.Future[None]] = set()
        self._reloading: asyncio.Future[None] | None = None
        ownership.refresh = self.reload_map

    def attach(self, pool: asyncpg.Pool, journal: Journal | None) -> None:
        self._pool, self._journal = pool, journal

    async def _load_map(self) -> None:
        assert self._pool is not None
        row = await cluster.load_map(self._pool)
        if row is None:
            return
        gained, lost = self.ownership.install(PartitionMap(row.epoch, row.owners))
        if lost:
            # Moved away without a hand-over (this shard was thought lost):
            # whatever it holds of them may be stale.
            self._drop(lost)
        if gained and self._journal is not None:
            self._background(self._expiry.load_once(self._pool))
            self._background(self._saga.announce_all_stock())

    async def reload_map(self) -> None:
        """Read the partition map again (one read at a time; callers share it)."""
        if self._reloading is None:
            self._reloading = asyncio.ensure_future(self._load_map())
            self._reloading.add_done_callback(lambda _: setattr(self, "_reloading", None))
        await asyncio.shield(self._reloading)

    async def follow(self) -> None:
        """Poll the map's epoch (runs until cancelled)."""
        while True:
            await asyncio.sleep(MAP_POLL_SECONDS)
            try:
                assert self._pool is not None
                if await cluster.load_epoch(self._pool) > self.ownership.epoch:
                    await self.reload_map()
            except Exception as exc:
                log.warning("could not read the partition map: %r", exc)

    async def release(self, partitions: list[int]) -> list[int]:
        """Hand these partitions over: stop serving them, let what is applying
        finish, make it durable, and drop their entities from memory.  The
        caller then gives them to another shard in the map."""
        mine = self.ownership.leave(partitions)
        if self._busy:
            await asyncio.wait(list(self._busy))
        if self._journal is not None:
            await self._journal.drain()
        self._drop(mine)
        return sorted(mine)

    def _drop(self, partitions: frozenset[int]) -> None:
        residents = self._residents
        entities = self.ownership.of([*residents.users, *residents.allowances], partitions)
        if entities and self._journal is not None:
            self._journal.purge(entities)
        residents.forget(entities)

    @contextlib.contextmanager
    def applying(self) -> Iterator[None]:
        """Marks work a hand-over must wait for."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._busy.add(done)
        try:
            yield
        finally:
            self._busy.discard(done)
            done.set_result(None)
