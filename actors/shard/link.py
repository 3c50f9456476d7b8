"""The request path from a gateway to a shard: one TCP connection per pair.

Ray hosts the shards (placement, names, restarts) and carries the control
calls (``start``, ``stats``, ``endpoint``, saga steps between shards).  The
batches themselves travel on a plain socket: under load a Ray call cost 5-7 ms
each way here (task specs, gRPC, Ray's threads taking the GIL from the
actor's event loop), a batch on a socket well under a millisecond, and the
p99 at 5,000 requests/s fell by about half (BENCHMARKS.md, "The request
path").  Nothing else changes: the gateway keeps one batch in flight per
shard, so requests sent on one connection still take effect in order.

The wire is length-prefixed frames (4 bytes, big-endian), MessagePack inside:

- gateway to shard, first frame: the token the shard handed out through Ray
  (``ShardActor.endpoint``), so only a process that can call the actor can
  send it batches (a wrong token closes the connection), then the sender's
  id (8 bytes, the same for all links of one gateway batcher);
- gateway to shard, then: ``[catalog_version, [[user_id, request], ...],
  map_epoch]`` (the partition map the gateway routed by: a shard behind it
  reads the map before applying);
- shard to gateway: ``[reply, ...]``, the msgpack replies of one batch, in its
  order, once the batch is durable;
- either way, an empty frame: a heartbeat.  The gateway sends one every
  ``HEARTBEAT_SECONDS``; the shard answers it at once, even while a batch
  applies.  A link that hears nothing for ``DEAD_AFTER_SECONDS`` is dead
  (a node gone without a reset): its batch is answered ``unavailable`` and
  the gateway links again.

A shard serves one connection's batches one after the other.  When a
connection is lost with a batch still applying, the same sender's later
connections wait for that batch to finish before theirs start: the gateway
reconnects and sends the next batch at once, and it must not overtake the
one it lost track of.  A sender's new connection also supersedes its old one
at once, so the guarantee holds even when the shard never saw the old one
drop (a reset lost between hosts).

Both ends live here: ``LinkServer`` (the shard's) and ``GatewaySide`` with
``open_link`` (the gateway's; ``server.batching`` drives it).
``FrameReader`` is the sans-I/O part (no asyncio), tested without sockets.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import secrets
import struct
from collections.abc import Awaitable, Callable
from typing import NamedTuple, cast

import msgspec

from actors.shard.records import BatchItem, ShardRequest
from protocol.errors import ErrorCode
from protocol.messages import Error

__all__ = [
    "DEAD_AFTER_SECONDS",
    "HEARTBEAT_SECONDS",
    "MAX_FRAME",
    "SENDER_SIZE",
    "Endpoint",
    "FrameError",
    "FrameReader",
    "GatewaySide",
    "LinkServer",
    "decode_replies",
    "encode_batch",
    "frame",
    "open_link",
    "unavailable",
]

log = logging.getLogger("loadout.link")

_HEADER = struct.Struct(">I")
#: Largest frame either side accepts; the gateway splits a batch that would
#: be larger (``server.batching``).
MAX_FRAME = 64 * 1024 * 1024
#: A connection must send its first frame, at most this long, within this
#: many seconds (a gateway sends it as soon as it connects).
_TOKEN_FRAME = 64
_TOKEN_SECONDS = 2.0
#: Connections not yet past their first frame, at most: past it, the oldest
#: is closed, so strangers holding connections open cannot lock gateways out.
_UNTRUSTED = 64
#: Batches waiting on one connection, at most: a gateway has one in flight.
_QUEUED = 4
TOKEN_SIZE = 16
SENDER_SIZE = 8
#: Heartbeats (see the module docstring).
HEARTBEAT_SECONDS = 0.5
DEAD_AFTER_SECONDS = 1.5
HEARTBEAT = b""
#: The shard drops a connection it has heard nothing on for this long.
_IDLE_SECONDS = 10.0

_encoder = msgspec.msgpack.Encoder()
_batch = msgspec.msgpack.Decoder(tuple[int, list[tuple[str, ShardRequest]], int])
_replies = msgspec.msgpack.Decoder(list[bytes])


class Endpoint(NamedTuple):
    """Where a shard takes batches, and the token that opens the connection."""

    host: str
    port: int
    token: bytes


class FrameError(Exception):
    """The peer broke the framing: the connection cannot be trusted any more."""


class FrameReader:
    """Bytes in, whole frames out.  ``first_limit``, if given, caps the first
    frame (a token) instead of ``limit``, so a peer not yet trusted cannot make
    us buffer a large frame."""

    def __init__(self, limit: int = MAX_FRAME, first_limit: int | None = None) -> None:
        self._limit = limit
        self._next_limit = limit if first_limit is None else first_limit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames: list[bytes] = []
        start, end = 0, len(self._buffer)
        while end - start >= 4:
            (size,) = _HEADER.unpack_from(self._buffer, start)
            if size > self._next_limit:
                raise FrameError(f"frame of {size} bytes is over the limit of {self._next_limit}")
            if end - start - 4 < size:
                break
            frames.append(bytes(self._buffer[start + 4 : start + 4 + size]))
            start += 4 + size
            self._next_limit = self._limit
        del self._buffer[:start]
        return frames


def frame(body: bytes) -> bytes:
    return _HEADER.pack(len(body)) + body


def encode_batch(catalog_version: int, items: list[BatchItem], map_epoch: int = 0) -> bytes:
    return frame(_encoder.encode((catalog_version, items, map_epoch)))


def decode_replies(body: bytes) -> list[bytes]:
    return _replies.decode(body)


Apply = Callable[[int, list[BatchItem], int], Awaitable[list[bytes]]]


class LinkServer:
    """The shard's side: accepts gateways' connections and applies their batches."""

    def __init__(self, shard: int, apply: Apply) -> None:
        self._shard = shard
        self._apply = apply
        self._token = secrets.token_bytes(TOKEN_SIZE)
        self._server: asyncio.Server | None = None
        self._starting: asyncio.Task[Endpoint] | None = None
        #: Per sender: batches whose connection was lost while they applied.
        self._orphans: dict[bytes, set[asyncio.Task[None]]] = {}
        self._links: dict[bytes, _ShardSide] = {}  # per sender, its current connection
        self._connections: set[_ShardSide] = set()
        #: Connections not yet past their token, oldest first.
        self._untrusted: dict[_ShardSide, None] = {}

    async def start(self, host: str) -> Endpoint:
        """Listen (once, however many callers ask at the same time)."""
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(self._listen(host))
        return await asyncio.shield(self._starting)

    async def _listen(self, host: str) -> Endpoint:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ShardSide(self), host, 0)
        port = self._server.sockets[0].getsockname()[1]
        log.info("shard %d takes batches on %s:%d", self._shard, host, port)
        return Endpoint(host, port, self._token)

    async def close(self) -> None:
        if self._starting is not None:
            await asyncio.wait({self._starting})
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.close()
        self._starting = self._server = None

    def _accepts(self, first: bytes) -> bool:
        return len(first) == TOKEN_SIZE + SENDER_SIZE and hmac.compare_digest(
            first[:TOKEN_SIZE], self._token
        )

    def _orphan(self, sender: bytes, task: asyncio.Task[None] | None) -> None:
        if task is not None and not task.done():
            orphans = self._orphans.setdefault(sender, set())
            orphans.add(task)
            task.add_done_callback(orphans.discard)


class _ShardSide(asyncio.Protocol):
    def __init__(self, server: LinkServer) -> None:
        self._server = server
        self._reader = FrameReader(first_limit=_TOKEN_FRAME)
        self._transport: asyncio.Transport | None = None
        self._peer = "?"
        self._trusted = False
        self._sender = b""
        self._frames: collections.deque[bytes] = collections.deque()
        self._serving: asyncio.Task[None] | None = None
        self._token_timer: asyncio.TimerHandle | None = None
        self._heard = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._peer = str(transport.get_extra_info("peername"))
        server = self._server
        server._connections.add(self)
        if len(server._untrusted) >= _UNTRUSTED:
            oldest = next(iter(server._untrusted))
            oldest._drop(f"over {_UNTRUSTED} connections without a token; the oldest goes")
            server._untrusted.pop(oldest, None)
        server._untrusted[self] = None
        loop = asyncio.get_running_loop()
        self._token_timer = loop.call_later(_TOKEN_SECONDS, self._drop, "no token in time")
        self._heard = loop.time()
        self._idle_timer = loop.call_later(_IDLE_SECONDS, self._check_idle)

    def _check_idle(self) -> None:
        """A gateway sends a heartbeat every half second: a connection silent
        for longer than ``_IDLE_SECONDS`` lost its gateway without a reset."""
        if self._transport is None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() - self._heard > _IDLE_SECONDS:
            return self._drop(f"nothing heard for {_IDLE_SECONDS} s")
        self._idle_timer = loop.call_later(_IDLE_SECONDS, self._check_idle)

    def _trust(self, sender: bytes) -> None:
        server = self._server
        self._trusted, self._sender = True, sender
        server._untrusted.pop(self, None)
        if self._token_timer is not None:
            self._token_timer.cancel()
        old = server._links.get(sender)
        if old is not None and old is not self:
            # The sender has moved on: what the old connection still applies
            # is an orphan this one waits for, whether or not we saw it drop.
            server._orphan(sender, old._serving)
            old._drop("superseded by a new link from the same sender")
        server._links[sender] = self

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._heard = asyncio.get_running_loop().time()
        try:
            frames = self._reader.feed(data)
        except FrameError as exc:
            return self._drop(str(exc))
        for body in frames:
            if not self._trusted:
                if not self._server._accepts(body):
                    return self._drop("wrong token")
                self._trust(body[TOKEN_SIZE:])
                continue
            if body == HEARTBEAT:
                if self._transport is not None:
                    self._transport.write(frame(HEARTBEAT))  # at once, whatever applies
                continue
            if len(self._frames) >= _QUEUED:
                return self._drop(f"over {_QUEUED} batches queued")
            self._frames.append(body)
        if self._frames and self._serving is None:
            self._serving = asyncio.get_running_loop().create_task(self._serve())

    def connection_lost(self, exc: Exception | None) -> None:
        server = self._server
        server._connections.discard(self)
        server._untrusted.pop(self, None)
        for timer in (self._token_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self._transport = None
        self._frames.clear()
        if self._trusted:
            # Still applying: the sender's later connections wait for it.
            server._orphan(self._sender, self._serving)
            if server._links.get(self._sender) is self:
                del server._links[self._sender]

    def _drop(self, reason: str) -> None:
        self._frames.clear()
        if self._transport is not None:
            log.warning(
                "shard %d: closing link from %s: %s", self._server._shard, self._peer, reason
            )
            self._transport.abort()

    async def _serve(self) -> None:
        try:
            orphans = set(self._server._orphans.get(self._sender, ()))
            if orphans:
                await asyncio.wait(orphans)
            while self._frames:
                body = self._frames.popleft()
                try:
                    catalog_version, items, map_epoch = _batch.decode(body)
                except msgspec.DecodeError as exc:
                    return self._drop(f"undecodable batch: {exc}")
                try:
                    replies = await self._server._apply(catalog_version, items, map_epoch)
                except Exception:
                    log.exception("shard %d: batch of %d failed", self._server._shard, len(items))
                    message = "the shard failed; retry with the same key"
                    replies = [unavailable(request.rid, message) for _, request in items]
                if self._transport is not None:
                    self._transport.write(frame(_encoder.encode(replies)))
        finally:
            self._serving = None


def unavailable(rid: str | int | None, message: str) -> bytes:
    """An ``unavailable`` error reply (for a request the shard did not answer)."""
    try:
        return _encoder.encode(Error(rid=rid, code=ErrorCode.UNAVAILABLE.value, message=message))
    except (OverflowError, TypeError):  # never let one odd rid stop a batch
        return _encoder.encode(Error(rid=None, code=ErrorCode.UNAVAILABLE.value, message=message))


# ---------------------------------------------------------------- the gateway's end

OnFrame = Callable[["GatewaySide", bytes], None]
OnLost = Callable[["GatewaySide", "Exception | None"], None]


class GatewaySide(asyncio.Protocol):
    """The gateway's end of one shard link: hands whole frames to its owner,
    and keeps the link's heartbeat (the module docstring)."""

    def __init__(self, shard: int, on_frame: OnFrame, on_lost: OnLost) -> None:
        self._shard = shard
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self._heard = 0.0
        self._beat: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        loop = asyncio.get_running_loop()
        self._heard = loop.time()
        self._beat = loop.call_later(HEARTBEAT_SECONDS, self._heartbeat)

    def _heartbeat(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        loop = asyncio.get_running_loop()
        if loop.time() - self._heard > DEAD_AFTER_SECONDS:
            return self.abort(f"no heartbeat for {DEAD_AFTER_SECONDS} s")
        transport.write(frame(HEARTBEAT))
        self._beat = loop.call_later(HEARTBEAT_SECONDS, self._heartbeat)

    def data_received(self, data: bytes) -> None:
        self._heard = asyncio.get_running_loop().time()
        try:
            frames = self._reader.feed(data)
        except FrameError as exc:
            return self.abort(str(exc))
        for body in frames:
            if self.transport is None or self.transport.is_closing():
                return  # dropped on an earlier frame: trust nothing after it
            if body != HEARTBEAT:
                self._on_frame(self, body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._beat is not None:
            self._beat.cancel()
        self._on_lost(self, exc)

    def send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def abort(self, reason: str) -> None:
        log.warning("shard %d link dropped: %s", self._shard, reason)
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_link(
    shard: int,
    endpoint: Endpoint,
    sender: bytes,
    on_frame: OnFrame,
    on_lost: OnLost,
) -> GatewaySide:
    """Connect to a shard's endpoint and present the token and sender id
    (the caller bounds the time it may take)."""
    loop = asyncio.get_running_loop()
    _, link = await loop.create_connection(
        lambda: GatewaySide(shard, on_frame, on_lost), endpoint.host, endpoint.port
    )
    transport = link.transport
    if transport is None or transport.is_closing():
        raise ConnectionError("the link closed as it opened")
    transport.write(frame(endpoint.token + sender))
    log.info("shard %d linked at %s:%d", shard, endpoint.host, endpoint.port)
    return link
