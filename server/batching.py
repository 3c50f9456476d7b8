"""Gateway-side batching: one Ray call per shard per batch, one batch in flight.

Everything bound for a shard while its previous batch is in flight travels
together in the next call (DESIGN.md, "Data flow of a purchase").  Keeping a
single batch in flight per shard is what makes requests sent on one
connection take effect in the order sent: Ray does not order concurrent calls
to an async actor, even from one caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from actors.host import BatchItem, ShardRequest
from actors.shard import shard_of
from protocol.errors import ErrorCode
from protocol.messages import Error

__all__ = ["Backend", "ShardBatcher", "ShardBusy", "ShardRouter"]

log = logging.getLogger("loadout.batching")

_encoder = msgspec.msgpack.Encoder()


def _retrieve(future: asyncio.Future[list[bytes]]) -> None:
    """A late batch's outcome is no longer awaited: read it so asyncio does not
    log it as never retrieved."""
    if not future.cancelled():
        future.exception()


class ShardBusy(Exception):
    """The shard's queue is full: the request was not sent."""


def _unavailable(rid: str | int | None, message: str) -> bytes:
    try:
        return _encoder.encode(Error(rid=rid, code=ErrorCode.UNAVAILABLE.value, message=message))
    except (OverflowError, TypeError):  # never let one odd rid stop the batcher
        return _encoder.encode(Error(rid=None, code=ErrorCode.UNAVAILABLE.value, message=message))


class ShardBatcher:
    """Queues requests for one shard actor and sends them in batches."""

    def __init__(
        self,
        shard: int,
        handle: Any,
        catalog_version: Callable[[], int],
        *,
        max_batch: int = 4096,
        max_queue: int = 100_000,
        timeout: float = 15.0,
        on_batch: Callable[[int], None] = lambda size: None,
    ) -> None:
        self._on_batch = on_batch
        self.shard = shard
        self._handle = handle
        self._catalog_version = catalog_version
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._timeout = timeout
        self._items: list[BatchItem] = []
        self._futures: list[asyncio.Future[bytes]] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._late: asyncio.Future[list[bytes]] | None = None
        self.batches = 0
        self.requests = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"batcher-{self.shard}"
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def submit(self, user_id: str, request: ShardRequest) -> asyncio.Future[bytes]:
        """Queue a request; the future gets the shard's msgpack reply."""
        if len(self._items) >= self._max_queue:
            raise ShardBusy(f"shard {self.shard} has {len(self._items)} requests waiting")
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._items.append((user_id, request))
        self._futures.append(future)
        self._idle.clear()
        self._wake.set()
        return future

    async def drain(self) -> None:
        """Wait until every request submitted so far has its reply."""
        await self._idle.wait()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            items, futures = self._items[: self._max_batch], self._futures[: self._max_batch]
            del self._items[: self._max_batch], self._futures[: self._max_batch]
            if not self._items:
                self._wake.clear()
            self._on_batch(len(items))
            if self._late is not None:
                # A timed-out batch may still be running on the shard: the next
                # one waits for it, or requests on one connection could overtake.
                await asyncio.wait({self._late}, timeout=self._timeout * 4)
                self._late = None
            call: asyncio.Future[list[bytes]] | None = None
            try:
                call = asyncio.ensure_future(
                    self._handle.apply.remote(self._catalog_version(), items)
                )
                replies: list[bytes] = await asyncio.wait_for(asyncio.shield(call), self._timeout)
            except asyncio.CancelledError:
                for (_, request), future in zip(items, futures, strict=True):
                    if not future.done():
                        future.set_result(_unavailable(request.rid, "server shutting down; retry"))
                raise
            except Exception as exc:
                if call is not None and not call.done():
                    self._late = call
                    call.add_done_callback(_retrieve)
                # The batch may or may not have run: every mutation carries an
                # idempotency key (or is naturally idempotent), so a retry is safe.
                log.warning("shard %d batch of %d failed: %r", self.shard, len(items), exc)
                replies = [
                    _unavailable(request.rid, "the shard did not answer; retry with the same key")
                    for _, request in items
                ]
            for future, reply in zip(futures, replies, strict=True):
                if not future.done():
                    future.set_result(reply)
            self.batches += 1
            self.requests += len(items)
            if not self._items:
                self._idle.set()


class Backend(Protocol):
    """What the gateway sends user requests to (the core under the gateway)."""

    def submit(self, user_id: str, request: ShardRequest) -> asyncio.Future[bytes]:
        """Queue a request; the future gets the msgpack reply. May raise ShardBusy."""
        ...

    async def drain(self) -> None:
        """Wait until every request submitted so far has its reply."""
        ...

    async def close(self) -> None: ...


class ShardRouter:
    """The actor core: each user's requests go to the batcher of its shard."""

    def __init__(self, batchers: list[ShardBatcher]) -> None:
        self.batchers = batchers

    def start(self) -> None:
        for batcher in self.batchers:
            batcher.start()

    def submit(self, user_id: str, request: ShardRequest) -> asyncio.Future[bytes]:
        return self.batchers[shard_of(user_id, len(self.batchers))].submit(user_id, request)

    async def drain(self) -> None:
        await asyncio.gather(*(b.drain() for b in self.batchers))

    async def close(self) -> None:
        for batcher in self.batchers:
            await batcher.close()
