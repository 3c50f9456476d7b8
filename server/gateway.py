"""The WebSocket gateway (PROTOCOL.md §1-§6).

Each connection runs a reader and a writer task; the survivor is cancelled
when either ends.  The reader decodes a frame, checks the rate limit and the
token's role, and routes the request: ``catalog`` is answered here, anything
about a user goes to that user's shard through its batcher.  Replies and
pushes go through a bounded send queue: a client that stops reading is
disconnected, not buffered without end.  A connection also has a bounded
number of requests in flight; past it, the reader stops reading, and TCP
pushes back on the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from actors.catalog import Catalog
from protocol.codec import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL, Codec, codec_for
from protocol.errors import ErrorCode, RequestError
from protocol.messages import (
    PROTOCOL_VERSION,
    CatalogChanged,
    CatalogReply,
    Categories,
    CategoriesReply,
    CategoryCount,
    ClientMessage,
    Grant,
    Inspect,
    Role,
    Welcome,
)
from protocol.messages import (
    Catalog as CatalogRequest,
)
from server.auth import AuthError, Identity, verify_token
from server.batching import Backend, ShardBusy
from server.metrics import Metrics
from server.ratelimit import RateLimiter

__all__ = ["Gateway", "GatewayLimits"]

log = logging.getLogger("loadout.gateway")

MAX_FRAME = 64 * 1024
_msgpack_any = msgspec.msgpack.Decoder()
_json = msgspec.json.Encoder()


class _Outcome(msgspec.Struct):
    """Just the fields of a reply the metrics need."""

    type: str
    code: str | None = None


_outcome = msgspec.msgpack.Decoder(_Outcome)


class GatewayLimits:
    in_flight = 256  # requests per connection awaiting a reply
    send_queue = 1024  # frames per connection waiting to be written
    bad_frames = 10  # per minute, then close 1008
    bad_frame_window = 60.0


class Client:
    """One open connection."""

    __slots__ = ("bad", "codec", "identity", "in_flight", "metrics", "outbox", "watched", "ws")

    def __init__(
        self, ws: ServerConnection, identity: Identity, codec: Codec, metrics: Metrics
    ) -> None:
        self.ws = ws
        self.metrics = metrics
        self.identity = identity
        self.codec = codec
        self.outbox: asyncio.Queue[bytes] = asyncio.Queue(GatewayLimits.send_queue)
        self.in_flight = asyncio.Semaphore(GatewayLimits.in_flight)
        self.bad: deque[float] = deque()
        self.watched = False

    def send(self, data: bytes) -> None:
        try:
            self.outbox.put_nowait(data)
        except asyncio.QueueFull:
            log.warning("closing %s: not reading (send queue full)", self.identity.user)
            self.metrics.disconnects.labels("not_reading").inc()
            asyncio.get_running_loop().create_task(self.ws.close(1008, "not reading"))


def _transcode(data: bytes) -> bytes:
    """A shard's MessagePack reply or push as JSON."""
    return _json.encode(_msgpack_any.decode(data))


class Gateway:
    def __init__(
        self,
        secret: str,
        backend: Backend,
        catalog: Callable[[], Catalog],
        limiter: RateLimiter,
        max_connections: int = 20_000,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        #: Units left of limited items (kept current from Redis by the app).
        self.stock_left: dict[str, int] = {}
        self._secret = secret
        self._max_connections = max_connections
        self.connections = 0
        self._backend = backend
        self._catalog = catalog
        self._limiter = limiter
        #: Identity of each handshake in progress, by connection; weak, so a
        #: handshake that fails after the token check leaves nothing behind.
        self._identities: weakref.WeakKeyDictionary[ServerConnection, Identity] = (
            weakref.WeakKeyDictionary()
        )
        self.clients: dict[str, set[Client]] = {}
        self.on_connection: Callable[[str], Awaitable[None]] | None = None
        self.on_disconnect: Callable[[str], None] = lambda user: None
        self._server: Server | None = None
        self.draining = False

    # --------------------------------------------------------------- serving

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> Server:
        self._server = await serve(
            self._handle,
            host,
            port,
            process_request=self._process_request,
            select_subprotocol=self._select_subprotocol,
            subprotocols=[JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL],  # type: ignore[list-item]
            max_size=MAX_FRAME,
            compression=None,  # small frames: deflate costs more CPU than it saves
            max_queue=64,
            write_limit=256 * 1024,
            ping_interval=20,
            ping_timeout=20,
            close_timeout=5,
            reuse_port=reuse_port,
        )
        return self._server

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = next(iter(self._server.sockets)).getsockname()[1]
        return port

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close(close_connections=False)
        self.draining = True

    async def close_all(self, code: int = 1001, reason: str = "server shutting down") -> None:
        """Let send queues empty (briefly), then close every connection."""
        clients = [c for group in self.clients.values() for c in group]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(c.outbox.join() for c in clients)), 5)
        await asyncio.gather(*(c.ws.close(code, reason) for c in clients), return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 10)

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if url.path == "/metrics":
            return connection.respond(HTTPStatus.OK, self.metrics.render().decode())
        if url.path != "/v1/ws":
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        if self.draining:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "shutting down\n")
        if self.connections + len(self._identities) >= self._max_connections:
            log.warning("refused a connection: %d open (the limit)", self.connections)
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n")
        token = _bearer(request.headers)
        if token is None:
            tokens = parse_qs(url.query).get("token")
            token = tokens[0] if tokens else None
        try:
            identity = verify_token(self._secret, token or "")
        except AuthError as exc:
            log.info("refused a handshake: %s", exc)
            response = connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="loadout"'
            return response
        self._identities[connection] = identity
        return None

    @staticmethod
    def _select_subprotocol(connection: ServerConnection, offered: Any) -> Any:
        for name in offered:
            if name in (JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL):
                return name
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        identity = self._identities.pop(ws)
        client = Client(ws, identity, codec_for(ws.subprotocol), self.metrics)
        self._register(client)
        try:
            if self.on_connection is not None:
                try:
                    await self.on_connection(identity.user)
                except Exception as exc:
                    log.error("no push subscription for %s: %r", identity.user, exc)
                    await ws.close(1011, "pushes unavailable; reconnect")
                    return
                finally:
                    # Balanced in _unregister whatever happened above.
                    client.watched = True
            welcome = Welcome(
                user=identity.user,
                role=identity.role,
                protocol=PROTOCOL_VERSION,
                server_time=time.time_ns() // 1_000_000,
            )
            client.send(client.codec.encode(welcome))
            reader = asyncio.create_task(self._read(client))
            writer = asyncio.create_task(self._write(client))
            done, pending = await asyncio.wait(
                {reader, writer}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for task in done:
                if task.exception() is not None:
                    log.error("connection of %s failed", identity.user, exc_info=task.exception())
        finally:
            self._unregister(client)

    def _register(self, client: Client) -> None:
        self.clients.setdefault(client.identity.user, set()).add(client)
        self.connections += 1
        self.metrics.connections.inc()

    def _unregister(self, client: Client) -> None:
        self.connections -= 1
        self.metrics.connections.dec()
        if client.watched:
            self.on_disconnect(client.identity.user)
        group = self.clients.get(client.identity.user)
        if group is None:
            return
        group.discard(client)
        if not group:
            del self.clients[client.identity.user]

    async def _write(self, client: Client) -> None:
        text = not client.codec.binary
        with contextlib.suppress(ConnectionClosed):
            while True:
                data = await client.outbox.get()
                try:
                    await client.ws.send(data, text=text)
                finally:
                    client.outbox.task_done()

    async def _read(self, client: Client) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in client.ws:
                await client.in_flight.acquire()
                try:
                    self._dispatch(client, frame)
                except Exception:
                    client.in_flight.release()
                    log.exception("bug while dispatching a request of %s", client.identity.user)
                    error = RequestError(ErrorCode.INTERNAL, "internal error")
                    client.send(client.codec.encode_error(None, error))

    # --------------------------------------------------------------- routing

    def _reply_now(self, client: Client, data: bytes) -> None:
        client.in_flight.release()
        client.send(data)

    def _refuse(
        self, client: Client, rid: str | int | None, error: RequestError, kind: str = "unknown"
    ) -> None:
        self.metrics.requests.labels(kind, error.code.value).inc()
        self._reply_now(client, client.codec.encode_error(rid, error))

    def _dispatch(self, client: Client, frame: bytes | str) -> None:
        codec, identity = client.codec, client.identity
        if self.draining:  # the drain waits only for what was dispatched before it
            error = RequestError(ErrorCode.UNAVAILABLE, "the server is shutting down; retry")
            return self._refuse(client, codec.rid_of(frame), error)
        wait = self._limiter.take(identity.user)
        if wait:
            rid = codec.rid_of(frame)
            error = RequestError(ErrorCode.RATE_LIMITED, "too many requests", retry_after_ms=wait)
            return self._refuse(client, rid, error)
        try:
            request = codec.decode_request(frame)
        except RequestError as error:
            self._refuse(client, codec.rid_of(frame), error, "invalid")
            return self._count_bad_frame(client)
        match request:
            case CatalogRequest():
                return self._answer_catalog(client, request)
            case Categories():
                counts = self._catalog().categories(request.game)
                reply = CategoriesReply(
                    rid=request.rid, items=[CategoryCount(c, n) for c, n in counts]
                )
                self.metrics.requests.labels("categories", "ok").inc()
                return self._reply_now(client, client.codec.encode(reply))
            case Grant() if identity.role is not Role.ADMIN:
                return self._refuse(client, request.rid, _forbidden("grant"), "grant")
            case Inspect() if identity.role is Role.PLAYER:
                return self._refuse(client, request.rid, _forbidden("inspect"), "inspect")
            case Grant() | Inspect():
                user = request.user
            case _:
                user = identity.user
        self._route(client, user, request)

    def _route(self, client: Client, user: str, request: ClientMessage) -> None:
        kind: str = request.__struct_config__.tag  # type: ignore[assignment]
        try:
            future = self._backend.submit(user, request)  # type: ignore[arg-type]
        except ShardBusy:
            error = RequestError(ErrorCode.UNAVAILABLE, "the server is overloaded; retry")
            return self._refuse(client, request.rid, error, kind)
        binary = client.codec.binary
        started = time.perf_counter()

        def done(f: asyncio.Future[bytes]) -> None:
            data = f.result()
            self._reply_now(client, data if binary else _transcode(data))
            outcome = _outcome.decode(data)
            self.metrics.requests.labels(kind, outcome.code or "ok").inc()
            self.metrics.latency.labels(kind).observe(time.perf_counter() - started)

        future.add_done_callback(done)

    def _answer_catalog(self, client: Client, request: CatalogRequest) -> None:
        catalog = self._catalog()
        try:
            items, after = catalog.page(
                request.game, request.category, request.cursor, request.limit
            )
        except ValueError as exc:
            error = RequestError(ErrorCode.BAD_REQUEST, str(exc))
            return self._refuse(client, request.rid, error, "catalog")
        now = time.time_ns() // 1_000_000
        reply = CatalogReply(
            rid=request.rid,
            version=catalog.version,
            items=[catalog.wire(i, now, self.stock_left.get(i.sku)) for i in items],
            next=after,
        )
        self.metrics.requests.labels("catalog", "ok").inc()
        self._reply_now(client, client.codec.encode(reply))

    def _count_bad_frame(self, client: Client) -> None:
        now = time.monotonic()
        client.bad.append(now)
        while client.bad and now - client.bad[0] > GatewayLimits.bad_frame_window:
            client.bad.popleft()
        if len(client.bad) > GatewayLimits.bad_frames:
            log.info("closing %s: too many bad frames", client.identity.user)
            self.metrics.disconnects.labels("bad_frames").inc()
            asyncio.get_running_loop().create_task(client.ws.close(1008, "too many bad frames"))

    # ----------------------------------------------------------------- pushes

    def deliver(self, user: str, data: bytes) -> None:
        """A push for ``user`` from Redis: to every connection of theirs here."""
        group = self.clients.get(user)
        if not group:
            return
        as_json: bytes | None = None
        self.metrics.pushes.inc(len(group))
        for client in list(group):
            if client.codec.binary:
                client.send(data)
            else:
                if as_json is None:
                    as_json = _transcode(data)
                client.send(as_json)

    def broadcast_catalog_changed(self, version: int) -> None:
        message = CatalogChanged(version=version)
        encoded = {c: codec_for(c).encode(message) for c in (JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL)}
        for group in self.clients.values():
            for client in list(group):
                client.send(encoded[client.codec.subprotocol])


def _forbidden(what: str) -> RequestError:
    return RequestError(ErrorCode.FORBIDDEN, f"this token's role may not {what}")


def _bearer(headers: Headers) -> str | None:
    value = headers.get("Authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""
