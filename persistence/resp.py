"""A Redis connection of our own: RESP2 over asyncio, parsed with hiredis.

redis-py hands every command and every pub/sub message through several
coroutine layers written in Python.  On the push path (a publish per shard
batch, a message per push in the gateway) those layers cost more than the
work itself, so the publisher (``persistence/publisher.py``) and the
gateway's subscriber (``server/subscriber.py``) use this instead: a
protocol that writes commands at once, in the order they are made, and
parses replies with hiredis' C reader inside ``data_received``.

It connects with a redis-py client's own settings (Unix socket or TCP, TLS,
user and password), so every Redis URL we accept works here too.
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

__all__ = ["OnMessage", "RespConnection", "connect"]

log = logging.getLogger("loadout.redis")

OnMessage = Callable[[bytes, bytes], None]
"""Called with (channel, data) for every pub/sub message, on the event loop."""


def _command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


class RespConnection(asyncio.Protocol):
    def __init__(
        self, on_message: OnMessage | None, on_lost: Callable[[RespConnection], None]
    ) -> None:
        self._on_message = on_message
        self._on_lost = on_lost
        self._reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        #: Replies we wait for, in order (pub/sub messages are not replies).
        self.expected: collections.deque[asyncio.Future[Any]] = collections.deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    @property
    def open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not False:
                self._reply(reply)
        except hiredis.ProtocolError as exc:
            log.error("bad reply from Redis: %r", exc)
            if self.transport is not None:
                self.transport.abort()

    def _reply(self, reply: Any) -> None:
        if (
            self._on_message is not None
            and type(reply) is list
            and len(reply) == 3
            and reply[0] == b"message"
        ):
            self._on_message(reply[1], reply[2])
        elif self.expected:
            future = self.expected.popleft()
            if not future.done():
                if isinstance(reply, hiredis.ReplyError):
                    future.set_exception(ConnectionError(f"Redis refused: {reply}"))
                else:
                    future.set_result(reply)

    def send(self, *parts: bytes, replies: int = 1) -> list[asyncio.Future[Any]]:
        """Write one command now; futures for the replies it will get."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("not connected to Redis")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(replies)]
        self.expected.extend(futures)
        self.transport.write(_command(*parts))
        return futures

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        while self.expected:
            future = self.expected.popleft()
            if not future.done():
                future.set_exception(ConnectionError("lost the connection to Redis"))
        self._on_lost(self)


async def connect(
    redis: aioredis.Redis,
    on_message: OnMessage | None,
    on_lost: Callable[[RespConnection], None],
) -> RespConnection:
    """Connect (and authenticate) the way ``redis``'s own connections do."""
    pool = redis.connection_pool
    settings: dict[str, Any] = dict(pool.connection_kwargs)
    loop = asyncio.get_running_loop()

    def protocol() -> RespConnection:
        return RespConnection(on_message, on_lost)

    connection: RespConnection
    if issubclass(pool.connection_class, UnixDomainSocketConnection):
        _, connection = await loop.create_unix_connection(protocol, settings["path"])
    else:
        context = _tls(settings) if issubclass(pool.connection_class, SSLConnection) else None
        _, connection = await loop.create_connection(
            protocol, settings.get("host", "localhost"), settings.get("port", 6379), ssl=context
        )
    password = settings.get("password")
    if password:
        user = settings.get("username")
        parts = [b"AUTH", *([user.encode()] if user else []), password.encode()]
        try:
            await asyncio.wait_for(connection.send(*parts)[0], 10)
        except BaseException:
            connection.close()
            raise
    return connection


def _tls(settings: dict[str, Any]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=settings.get("ssl_ca_certs"))
    if settings.get("ssl_certfile"):
        context.load_cert_chain(settings["ssl_certfile"], settings.get("ssl_keyfile"))
    if settings.get("ssl_cert_reqs") in ("none", ssl.CERT_NONE):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
