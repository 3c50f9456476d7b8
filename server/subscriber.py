"""A Redis pub/sub connection read with hiredis, below redis-py's per-message layer.

redis-py's ``PubSub`` hands every message through several coroutine layers
(``listen``, ``get_message``, ``parse_response``, the retry wrapper, the
parser).  At 5,000 requests/s those layers cost the gateway about a tenth of
its CPU, one push message at a time (BENCHMARKS.md, "Third session").  This
connection speaks the same protocol (RESP2 pub/sub) with hiredis' C parser
inside ``data_received``, and calls back once per message.

It connects the way the gateway's redis-py client does (the client's own
connection settings: Unix socket or TCP, TLS, user and password).  When the
connection drops it reconnects with a growing delay and subscribes again to
every channel it had; messages published meanwhile are lost, as with
redis-py (pushes are best effort: clients resync with ``state``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from collections.abc import Callable
from typing import Any, cast

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection

__all__ = ["Subscriber"]

log = logging.getLogger("loadout.pushes")

OnMessage = Callable[[bytes, bytes], None]
"""Called with (channel, data) for every message, on the event loop."""


def _command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


class _Connection(asyncio.Protocol):
    def __init__(self, on_message: OnMessage, on_lost: Callable[[_Connection], None]) -> None:
        self._on_message = on_message
        self._on_lost = on_lost
        self._reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        #: Replies we wait for, in order: subscribe/unsubscribe confirmations
        #: and the answer to AUTH.
        self.expected: collections.deque[asyncio.Future[Any]] = collections.deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not False:
                self._reply(reply)
        except hiredis.ProtocolError as exc:
            log.error("push subscription: bad reply from Redis: %r", exc)
            if self.transport is not None:
                self.transport.abort()

    def _reply(self, reply: Any) -> None:
        if type(reply) is list and len(reply) == 3 and reply[0] == b"message":
            self._on_message(reply[1], reply[2])
        elif type(reply) is list and reply and reply[0] in (b"subscribe", b"unsubscribe"):
            self._answer(reply)
        elif isinstance(reply, hiredis.ReplyError):
            self._answer(reply)
        elif type(reply) is not list:  # +OK to AUTH
            self._answer(reply)
        # pings, psubscribe and the rest: we send none of them

    def _answer(self, reply: Any) -> None:
        if self.expected:
            future = self.expected.popleft()
            if not future.done():
                if isinstance(reply, hiredis.ReplyError):
                    future.set_exception(ConnectionError(f"Redis refused: {reply}"))
                else:
                    future.set_result(reply)

    def send(self, *parts: bytes, replies: int = 1) -> list[asyncio.Future[Any]]:
        """Write one command; futures for the replies it will get."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("not connected to Redis")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(replies)]
        self.expected.extend(futures)
        self.transport.write(_command(*parts))
        return futures

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        while self.expected:
            future = self.expected.popleft()
            if not future.done():
                future.set_exception(ConnectionError("lost the connection to Redis"))
        self._on_lost(self)


class Subscriber:
    """Subscribes to channels and calls ``on_message`` for what is published."""

    def __init__(self, redis: aioredis.Redis, on_message: OnMessage) -> None:
        pool = redis.connection_pool
        self._settings: dict[str, Any] = dict(pool.connection_kwargs)
        self._kind = pool.connection_class
        self._on_message = on_message
        self._channels: set[bytes] = set()
        self._connection: _Connection | None = None
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
        if not channels:
            return
        if self._connection is None:
            raise ConnectionError("not connected to Redis")
        replies = self._connection.send(command, *channels, replies=len(channels))
        await asyncio.gather(*replies)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        settings = self._settings

        def protocol() -> _Connection:
            return _Connection(self._on_message, self._lost)

        connection: _Connection
        if issubclass(self._kind, UnixDomainSocketConnection):
            _, connection = await loop.create_unix_connection(protocol, settings["path"])
        else:
            context = _tls(settings) if issubclass(self._kind, SSLConnection) else None
            _, connection = await loop.create_connection(
                protocol, settings.get("host", "localhost"), settings.get("port", 6379), ssl=context
            )
        try:
            password = settings.get("password")
            if password:
                user = settings.get("username")
                parts = [b"AUTH", *([user.encode()] if user else []), password.encode()]
                await asyncio.wait_for(connection.send(*parts)[0], 10)
            if self._channels:
                replies = connection.send(
                    b"SUBSCRIBE", *self._channels, replies=len(self._channels)
                )
                await asyncio.wait_for(asyncio.gather(*replies), 10)
        except BaseException:
            if connection.transport is not None:
                connection.transport.abort()
            raise
        self._connection = connection

    def _lost(self, connection: _Connection) -> None:
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


def _tls(settings: dict[str, Any]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=settings.get("ssl_ca_certs"))
    if settings.get("ssl_certfile"):
        context.load_cert_chain(settings["ssl_certfile"], settings.get("ssl_keyfile"))
    if settings.get("ssl_cert_reqs") in ("none", ssl.CERT_NONE):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
