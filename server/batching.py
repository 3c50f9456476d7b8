"""Gateway-side batching: one batch in flight per shard, sent on the shard's link.

Everything bound for a shard while its previous batch is in flight travels
together in the next batch (DESIGN.md, "Data flow of a purchase").  Keeping a
single batch in flight per shard is what makes requests sent on one
connection take effect in the order sent.

Batches travel on one TCP connection per shard (``actors/shard/link.py``), found
through Ray (``ShardActor.endpoint``).  The batcher is driven by callbacks,
not a task: a reply frame answers every request of its batch and sends the
next batch in the same loop turn.  A lost connection or a batch that times
out answers its requests ``unavailable`` (the batch may or may not have run:
every mutation carries an idempotency key, so a retry is safe) and the
batcher reconnects; the shard makes the next batch wait for the lost one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from actors.saga import STEP_TIMEOUT
from actors.shard.link import (
    MAX_FRAME,
    SENDER_SIZE,
    Endpoint,
    GatewaySide,
    decode_replies,
    encode_batch,
    open_link,
    unavailable,
)
from actors.shard.records import MOVED, BatchItem, ShardRequest
from persistence.store import STATEMENT_TIMEOUT

__all__ = ["Answer", "Backend", "ShardBatcher", "ShardBusy"]

log = logging.getLogger("loadout.batching")


Answer = Callable[[bytes], None]
"""Called once, on the event loop, with a request's msgpack reply."""


class ShardBusy(Exception):
    """The shard's queue is full: the request was not sent."""


_LOST = "the shard did not answer; retry with the same key"
#: How long a batch may take before its link is given up: longer than the
#: shard's own worst case (a journal flush bounded by the statement timeout,
#: and a saga step), so that a slow database does not tear links down.
BATCH_TIMEOUT = STATEMENT_TIMEOUT + STEP_TIMEOUT + 5.0


class _Batch:
    """One batch on the link: its requests, who waits for their replies, its deadline."""

    __slots__ = ("items", "replies", "timer")

    def __init__(self, items: list[BatchItem], replies: list[Answer]) -> None:
        self.items = items
        self.replies = replies
        self.timer: asyncio.TimerHandle | None = None


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
        timeout: float = 5.0,
        batch_timeout: float = BATCH_TIMEOUT,
        on_batch: Callable[[int], None] = lambda size: None,
        resolve: Callable[[], Any] | None = None,
    ) -> None:
        self._on_batch = on_batch
        self.shard = shard
        self._handle = handle
        self._resolve = resolve
        self._catalog_version = catalog_version
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._timeout = timeout
        self._batch_timeout = batch_timeout
        self._items: list[BatchItem] = []
        self._replies: list[Answer] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._link: GatewaySide | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._down_since: float | None = time.monotonic()
        self._in_flight: _Batch | None = None
        self._send_scheduled = False
        self._closed = False
        #: Who we are to the shard: its new links' batches wait for our lost ones.
        self._sender = secrets.token_bytes(SENDER_SIZE)
        self._linked = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.batches = 0
        self.requests = 0
        #: Requests queued here so far (``answered``: how many of them have their reply).
        self.submitted = 0
        #: Hears of each request the shard answered ``MOVED`` (not applied).
        self.on_moved: Callable[[int, BatchItem, Answer], None] | None = None
        #: The partition map's epoch the gateway routes by (sent with each batch).
        self.map_epoch: Callable[[], int] = lambda: 0

    @property
    def answered(self) -> int:
        """Requests submitted that have had their reply (replies go in order)."""
        flying = len(self._in_flight.items) if self._in_flight is not None else 0
        return self.submitted - len(self._items) - flying

    def connect(self) -> None:
        """Start linking to the shard (requests queue meanwhile)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._connecting = self._loop.create_task(self._connect(), name=f"link-{self.shard}")

    async def start(self, wait: float | None = None) -> None:
        """Connect to the shard (waiting at most ``wait`` seconds, by default
        the timeout, for the first link)."""
        self.connect()
        assert self._connecting is not None or self._link is not None
        wait = self._timeout if wait is None else wait
        try:
            await asyncio.wait_for(self._linked.wait(), wait)
        except TimeoutError:
            if self._connecting is not None:
                self._connecting.cancel()
            raise ConnectionError(f"shard {self.shard} took no link in {wait} s") from None

    @property
    def linked(self) -> bool:
        """Has the batcher a link to its shard now (readiness)?"""
        return self._link is not None

    async def close(self) -> None:
        """Answer everything still waiting ("shutting down") and send nothing more."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        message = "server shutting down; retry"
        batch = self._in_flight
        if batch is not None:
            self._finish(batch)
            self._answer_all(batch, message)
        self._answer_all(_Batch(self._items, self._replies), message)
        self._items, self._replies = [], []
        if self._link is not None:
            self._link.close()
        self._idle.set()

    def submit(self, user_id: str, request: ShardRequest, reply: Answer) -> None:
        """Queue a request; ``reply`` gets the shard's msgpack reply."""
        if len(self._items) >= self._max_queue:
            raise ShardBusy(f"shard {self.shard} has {len(self._items)} requests waiting")
        if self._closed:
            return reply(unavailable(request.rid, "server shutting down; retry"))
        if self._link is None and self._unreachable():
            return reply(unavailable(request.rid, "the shard is not reachable; retry"))
        self._items.append((user_id, request))
        self._replies.append(reply)
        self.submitted += 1
        self._idle.clear()
        if self._in_flight is None and not self._send_scheduled:
            # Send at the end of this loop turn, with whatever else arrives in it.
            self._send_scheduled = True
            assert self._loop is not None, "start() the batcher first"
            self._loop.call_soon(self._send)

    async def drain(self) -> None:
        """Wait until every request submitted so far has its reply."""
        await self._idle.wait()

    # ------------------------------------------------------------- the link

    def _unreachable(self) -> bool:
        """Down for longer than the timeout: answer at once instead of queueing."""
        return self._down_since is not None and time.monotonic() - self._down_since > self._timeout

    async def _connect(self) -> None:
        """Find the shard through Ray and link to it, retrying until it works
        (or the batcher closes)."""
        delay = 0.05
        failures = 0
        while not self._closed:
            try:
                link = await self._link_once()
            except Exception as exc:
                log.warning("shard %d: no link (%r); retrying in %.2f s", self.shard, exc, delay)
                failures += 1
                if self._resolve is not None and failures % 3 == 0:
                    # The actor may be gone for good (or a zombie): look it up by name.
                    with contextlib.suppress(Exception):
                        self._handle = self._resolve()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                if self._unreachable():
                    self._fail_waiting("the shard is not reachable; retry")
                continue
            if link is None:  # closed meanwhile
                return
            self._link, self._down_since, self._connecting = link, None, None
            self._linked.set()
            self._send()
            return

    async def _link_once(self) -> GatewaySide | None:
        endpoint: Endpoint = await asyncio.wait_for(self._handle.endpoint.remote(), self._timeout)
        link = await asyncio.wait_for(
            open_link(self.shard, endpoint, self._sender, self._replied, self._lost),
            self._timeout,
        )
        if self._closed:
            link.close()
            return None
        if link.transport is None or link.transport.is_closing():
            # Lost before it was ours: ``_lost`` ignored it, so retry here.
            raise ConnectionError("the link closed as it opened")
        return link

    def _lost(self, link: GatewaySide, exc: Exception | None) -> None:
        if link is not self._link:
            return
        self._link, self._down_since = None, time.monotonic()
        self._linked.clear()
        if not self._closed:
            log.warning("shard %d link lost: %r; reconnecting", self.shard, exc)
        batch = self._in_flight
        if batch is not None:
            self._finish(batch)
            self._answer_all(batch, _LOST)
        if not self._items:
            self._idle.set()
        if not self._closed and self._connecting is None:
            assert self._loop is not None
            self._connecting = self._loop.create_task(self._connect(), name=f"link-{self.shard}")

    def _fail_waiting(self, message: str) -> None:
        waiting = _Batch(self._items, self._replies)
        self._items, self._replies = [], []
        self._answer_all(waiting, message)
        if self._in_flight is None:
            self._idle.set()

    # ------------------------------------------------------------- batches

    def _send(self) -> None:
        self._send_scheduled = False
        if self._in_flight is not None or self._closed:
            return  # the reply sends what waits
        if not self._items:
            self._idle.set()
            return
        link = self._link
        if link is None or link.transport is None:
            return  # the reconnection sends what waits
        size = min(self._max_batch, len(self._items))
        try:
            while True:
                data = encode_batch(self._catalog_version(), self._items[:size], self.map_epoch())
                if len(data) <= MAX_FRAME or size == 1:
                    break
                size //= 2  # too big for one frame: send the first half first
        except Exception as exc:  # a bug: never stop the queue
            batch = _Batch(self._items[:size], self._replies[:size])
            del self._items[:size], self._replies[:size]
            log.error("shard %d: batch of %d not encodable: %r", self.shard, size, exc)
            self._answer_all(batch, "internal error; retry")
            return self._send()
        batch = _Batch(self._items[:size], self._replies[:size])
        del self._items[:size], self._replies[:size]
        if len(data) > MAX_FRAME:  # one request alone: never sent, never stuck
            self._answer_all(batch, "the request is too large")
            return self._send()
        self._on_batch(size)
        assert self._loop is not None
        self._in_flight = batch
        batch.timer = self._loop.call_later(self._batch_timeout, self._time_out, batch)
        link.send(data)

    def _replied(self, link: GatewaySide, body: bytes) -> None:
        batch = self._in_flight
        if link is not self._link or batch is None:
            return link.abort("a reply with no batch in flight")
        try:
            replies = decode_replies(body)
            if len(replies) != len(batch.items):
                raise ValueError(f"{len(replies)} replies to a batch of {len(batch.items)}")
        except (msgspec.DecodeError, ValueError) as exc:
            return link.abort(f"bad reply: {exc}")
        self._finish(batch)
        on_moved = self.on_moved
        for item, reply, data in zip(batch.items, batch.replies, replies, strict=True):
            if data == MOVED:  # not applied: the router sends it where the map says
                if on_moved is not None:
                    on_moved(self.shard, item, reply)
                else:
                    _call(reply, unavailable(item[1].rid, "the shard moved; retry"))
            else:
                _call(reply, data)
        self._send()

    def _time_out(self, batch: _Batch) -> None:
        """No reply in time: answer the batch and drop the link; the shard
        makes the next link's batches wait for this one."""
        if batch is not self._in_flight:
            return
        log.warning("shard %d: batch of %d timed out", self.shard, len(batch.items))
        if self._link is not None:
            self._link.abort("timed out")  # connection_lost answers the batch

    def _finish(self, batch: _Batch) -> None:
        if batch.timer is not None:
            batch.timer.cancel()
        self._in_flight = None
        self.batches += 1
        self.requests += len(batch.items)

    @staticmethod
    def _answer_all(batch: _Batch, message: str) -> None:
        for (_, request), reply in zip(batch.items, batch.replies, strict=True):
            _call(reply, unavailable(request.rid, message))


def _call(reply: Answer, data: bytes) -> None:
    """One request's reply: a failing callback must not cost the others theirs."""
    try:
        reply(data)
    except Exception:
        log.exception("reply callback failed")


class Backend(Protocol):
    """What the gateway sends user requests to (the core under the gateway)."""

    def submit(self, user_id: str, request: ShardRequest, reply: Answer) -> None:
        """Queue a request; ``reply`` is called once, on the event loop, with
        its msgpack reply.  May raise ShardBusy (then ``reply`` is never called)."""
        ...

    async def drain(self) -> None:
        """Wait until every request submitted so far has its reply."""
        ...

    async def close(self) -> None: ...
