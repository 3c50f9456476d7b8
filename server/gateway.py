"""The WebSocket gateway (PROTOCOL.md §1-§6).

The gateway serves WebSockets with picows, whose framing, masking and HTTP
handshake run in compiled code: on this path Python's websockets library cost
more CPU than everything behind the gateway (BENCHMARKS.md, "Where the time
goes").  picows calls us back once per frame, so a connection is a listener
object, not a pair of tasks:

* ``on_ws_frame`` decodes the frame, checks the rate limit and the token's
  role, and routes the request: ``catalog`` and ``categories`` are answered
  here, anything about a user goes to that user's shard through its batcher.
  When the shard's reply arrives, a callback writes it to the socket.
* A connection has a bounded number of requests in flight; past it, frames
  wait in the connection's ``held`` queue and the gateway stops reading the
  socket, so TCP pushes back on the client.  The queue holds at most what one
  socket read brought in.
* Writes go straight to the socket.  A client that stops reading while its
  unsent bytes pass a bound is closed with 1008, not buffered without end.

The handshake checks the path, the token (HTTP 401 without a good one) and
the connection limit (503), and picks the subprotocol; ``/healthz`` and
``/readyz`` are answered as plain HTTP on the same port.  ``/metrics`` is
not: it lives on the operators' HTTP port (server/http.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import msgspec
from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

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
_SUBPROTOCOLS = (JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL)
_msgpack_any = msgspec.msgpack.Decoder()
_json = msgspec.json.Encoder()


class _Outcome(msgspec.Struct):
    """Just the fields of a reply the metrics need."""

    type: str
    code: str | None = None


_outcome = msgspec.msgpack.Decoder(_Outcome)


class GatewayLimits:
    in_flight = 256  # requests per connection awaiting a reply; then stop reading
    send_buffer = 1024 * 1024  # unsent bytes per connection; then hang up
    fragments = 1024  # frames in one fragmented message, then close 1008
    close_timeout = 5.0  # after our close frame, for the client's, then hang up
    bad_frames = 10  # per minute, then close 1008
    bad_frame_window = 60.0
    handshake_timeout = 10.0
    ping_interval = 20.0  # an idle connection is pinged; no pong in time closes it


def _frame_header(opcode: int, size: int) -> bytes:
    """The header of an unmasked, unfragmented server frame (RFC 6455 §5.2)."""
    if size < 126:
        return bytes((0x80 | opcode, size))
    if size < 65536:
        return bytes((0x80 | opcode, 126)) + size.to_bytes(2, "big")
    return bytes((0x80 | opcode, 127)) + size.to_bytes(8, "big")


def _transcode(data: bytes) -> bytes:
    """A shard's MessagePack reply or push as JSON."""
    return _json.encode(_msgpack_any.decode(data))


class Client(WSListener):
    """One open connection: picows calls it back for every frame."""

    def __init__(self, gateway: Gateway, identity: Identity, codec: Codec) -> None:
        super().__init__()
        self.gateway = gateway
        self.identity = identity
        self.codec = codec
        self.opcode = (WSMsgType.BINARY if codec.binary else WSMsgType.TEXT).value
        #: Frames (headers and payloads) waiting for this loop turn's flush.
        self.unsent: list[bytes] = []
        self.transport: WSTransport | None = None
        self.in_flight = 0
        #: Frames not yet dispatched: before the welcome (the push subscription
        #: comes first) or past the in-flight limit.  Reading stops meanwhile.
        self.held: deque[bytes | str] = deque()
        self.ready = False
        self.releasing = False
        self.reading_paused = False
        self.writing_paused = False
        self.closing = False
        #: A message arriving in several frames: its kind and its parts so far.
        self.parts: list[bytes] = []
        self.parts_size = 0
        self.parts_kind = WSMsgType.CONTINUATION
        self.bad: deque[float] = deque()
        self.watched = False
        self.setup: asyncio.Task[None] | None = None

    # ------------------------------------------------------- picows callbacks

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.gateway._connected(self)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closing = True
        if self.setup is not None:
            self.setup.cancel()
        self.gateway._disconnected(self)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if self.closing:  # our close frame is out: wait for theirs, ignore the rest
            if kind is WSMsgType.CLOSE:
                transport.disconnect()
            return
        if kind is WSMsgType.CLOSE:  # the client closes: answer, then hang up
            self.flush()
            self.closing = True
            if frame.payload_size < 2:  # no code given: 1000, never 0 (RFC 6455 §7.4)
                transport.send_close(WSCloseCode.OK)
            else:
                transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
            return
        if kind is WSMsgType.PONG or kind is WSMsgType.PING:
            return  # picows answers pings itself
        if kind is WSMsgType.CONTINUATION or not frame.fin:
            data = self._assemble(kind, frame)
            if data is None:
                return
            kind, payload = data
        else:
            payload = frame.get_payload_as_bytes()
        if kind is WSMsgType.TEXT:
            try:
                message: bytes | str = payload.decode()
            except UnicodeDecodeError:
                return self.close(WSCloseCode.INVALID_TEXT, "text frame is not UTF-8")
        else:
            message = payload
        if self.held or not self.ready or self.in_flight >= GatewayLimits.in_flight:
            self.held.append(message)
            self._pause_reading()
            return
        self.gateway._receive(self, message)

    def _assemble(self, kind: WSMsgType, frame: WSFrame) -> tuple[WSMsgType, bytes] | None:
        """Collect a fragmented message (RFC 6455 §5.4); the whole when complete."""
        if kind is not WSMsgType.CONTINUATION:
            if self.parts_kind is not WSMsgType.CONTINUATION:
                self.close(WSCloseCode.PROTOCOL_ERROR, "new message inside a fragmented one")
                return None
            self.parts_kind = kind
        elif self.parts_kind is WSMsgType.CONTINUATION:
            self.close(WSCloseCode.PROTOCOL_ERROR, "continuation of no message")
            return None
        part = frame.get_payload_as_bytes()
        self.parts.append(part)
        self.parts_size += len(part)
        if self.parts_size > MAX_FRAME:
            self.close(WSCloseCode.MESSAGE_TOO_BIG, "message over 64 KiB")
            return None
        if len(self.parts) > GatewayLimits.fragments:
            self.close(WSCloseCode.POLICY_VIOLATION, "too many fragments in one message")
            return None
        if not frame.fin:
            return None
        whole, kind = b"".join(self.parts), self.parts_kind
        self.parts, self.parts_kind, self.parts_size = [], WSMsgType.CONTINUATION, 0
        return kind, whole

    # ----------------------------------------------------------------- output

    def send(self, data: bytes) -> None:
        """Queue a whole message; it is written with the others at ``flush``."""
        if self.transport is None or self.closing:
            return
        if not self.unsent:
            self.gateway._flush_soon(self)
        self.unsent.append(_frame_header(self.opcode, len(data)))
        self.unsent.append(data)

    def flush(self) -> None:
        """Write the queued messages in one go: one system call, not one each.

        Nothing is written before the welcome, which must be the first frame
        (PROTOCOL.md §1): pushes that came earlier wait behind it."""
        transport, unsent = self.transport, self.unsent
        if not self.ready and not self.closing:
            return
        if (
            not unsent
            or transport is None
            or self.closing
            or transport.is_close_frame_sent  # picows closed it (a protocol error)
            or transport.is_disconnected
        ):
            unsent.clear()
            return
        data = b"".join(unsent)
        unsent.clear()
        socket = transport.underlying_transport
        if self.writing_paused and socket.get_write_buffer_size() > GatewayLimits.send_buffer:
            log.warning("closing %s: not reading (send buffer full)", self.identity.user)
            self.gateway.metrics.disconnects.labels("not_reading").inc()
            # The close frame would queue behind what the client does not read.
            self.closing = True
            transport.disconnect(graceful=False)
            return
        socket.write(data)

    def close(self, code: WSCloseCode, reason: str) -> None:
        """Send what is queued and a close frame, then wait for the client's.

        Hanging up at once would leave unread requests in the socket, and the
        kernel would answer them with a reset that can destroy the replies and
        the close frame still on their way.  So reading resumes (what arrives
        is dropped) until the client's close frame, or ``close_timeout``."""
        transport = self.transport
        if transport is None or self.closing:
            return
        self.flush()
        self.closing = True
        self.held.clear()
        if transport.is_disconnected:
            return
        if not transport.is_close_frame_sent:
            transport.send_close(code, reason.encode())
        if self.reading_paused:
            self.reading_paused = False
            transport.underlying_transport.resume_reading()
        asyncio.get_running_loop().call_later(
            GatewayLimits.close_timeout, transport.disconnect, False
        )

    # ----------------------------------------------------------- flow control

    def took(self) -> None:
        self.in_flight += 1
        if self.in_flight >= GatewayLimits.in_flight:
            self._pause_reading()

    def answered(self) -> None:
        self.in_flight -= 1
        if self.held:
            self.release()
        elif self.reading_paused and self.in_flight < GatewayLimits.in_flight // 2:
            self._resume_reading()

    def release(self) -> None:
        """Dispatch held frames, in order, while the in-flight limit allows."""
        if self.releasing or not self.ready:
            return  # the loop below is already running, further up the stack
        self.releasing = True
        try:
            while self.held and self.in_flight < GatewayLimits.in_flight and not self.closing:
                self.gateway._receive(self, self.held.popleft())
        finally:
            self.releasing = False
        if not self.held and self.in_flight < GatewayLimits.in_flight:
            self._resume_reading()

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closing:
            self.reading_paused = True
            self.transport.underlying_transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closing:
            self.reading_paused = False
            self.transport.underlying_transport.resume_reading()


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
        self.clients: dict[str, set[Client]] = {}
        self.on_connection: Callable[[str], Awaitable[None]] | None = None
        self.on_disconnect: Callable[[str], None] = lambda user: None
        #: ``/readyz``: ready or not, and the JSON body (server/readiness.py).
        self.readiness: Callable[[], tuple[bool, bytes]] = lambda: (True, b"{}\n")
        self._server: asyncio.Server | None = None
        self._all: set[Client] = set()
        self._unflushed: list[Client] = []
        self.draining = False

    # --------------------------------------------------------------- serving

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> asyncio.Server:
        picows_log = logging.getLogger("picows")
        if picows_log.level == logging.NOTSET:  # it logs every connection at INFO
            picows_log.setLevel(logging.WARNING)
        self._server = await ws_create_server(
            self._upgrade,
            host,
            port,
            websocket_handshake_timeout=GatewayLimits.handshake_timeout,
            enable_auto_ping=True,
            auto_ping_idle_timeout=GatewayLimits.ping_interval,
            auto_ping_reply_timeout=GatewayLimits.ping_interval,
            max_frame_size=MAX_FRAME,
            reuse_port=reuse_port,
            logger_name="loadout.ws",
        )
        return self._server

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()
        self.draining = True

    async def close_all(self, code: int = 1001, reason: str = "server shutting down") -> None:
        """Close every connection once what was sent to it is written (briefly)."""
        clients = list(self._all)
        for client in clients:
            client.close(WSCloseCode(code), reason)
        waits = [c.transport.wait_disconnected() for c in clients if c.transport is not None]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), 5)
        for client in clients:  # whoever did not finish in time
            if client.transport is not None:
                client.transport.disconnect(graceful=False)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 10)

    def _upgrade(self, request: WSUpgradeRequest) -> WSUpgradeResponseWithListener:
        """Route an HTTP request: a WebSocket for a good token, else a response."""
        url = urlsplit(request.path.decode("latin-1"))
        if url.path == "/healthz":
            return _plain(WSUpgradeResponse.create_ok_response(b"ok\n"))
        if url.path == "/readyz":
            ready, body = self.readiness()
            content_type = {"Content-Type": "application/json"}
            if ready:
                return _plain(WSUpgradeResponse.create_ok_response(body, content_type))
            status = HTTPStatus.SERVICE_UNAVAILABLE
            return _plain(WSUpgradeResponse.create_error_response(status, body, content_type))
        if url.path != "/v1/ws":
            return _error(HTTPStatus.NOT_FOUND, "not found")
        if self.draining:
            return _error(HTTPStatus.SERVICE_UNAVAILABLE, "shutting down")
        if self.connections >= self._max_connections:
            log.warning("refused a connection: %d open (the limit)", self.connections)
            return _error(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections")
        token = _bearer(request.headers.get("Authorization"))
        if token is None:
            tokens = parse_qs(url.query).get("token")
            token = tokens[0] if tokens else None
        try:
            identity = verify_token(self._secret, token or "")
        except AuthError as exc:
            log.info("refused a handshake: %s", exc)
            challenge = {"WWW-Authenticate": 'Bearer realm="loadout"'}
            return _error(HTTPStatus.UNAUTHORIZED, "unauthorized", challenge)
        subprotocol = _pick_subprotocol(request.headers.getall("Sec-WebSocket-Protocol", []))
        headers = {"Sec-WebSocket-Protocol": subprotocol} if subprotocol else None
        client = Client(self, identity, codec_for(subprotocol))
        return WSUpgradeResponseWithListener(WSUpgradeResponse.create_101_response(headers), client)

    # ------------------------------------------------------------ connections

    def _flush_soon(self, client: Client) -> None:
        """Flush ``client`` at the end of this loop turn, with every other one
        that got messages in it (replies of one shard batch, pushes of one
        Redis read)."""
        if not self._unflushed:
            asyncio.get_running_loop().call_soon(self._flush)
        self._unflushed.append(client)

    def _flush(self) -> None:
        clients, self._unflushed = self._unflushed, []
        for client in clients:
            try:
                client.flush()
            except Exception:  # one broken socket must not stop the others' writes
                client.unsent.clear()
                log.exception("could not write to %s", client.identity.user)

    def _connected(self, client: Client) -> None:
        self.clients.setdefault(client.identity.user, set()).add(client)
        self._all.add(client)
        self.connections += 1
        self.metrics.connections.inc()
        client.setup = asyncio.get_running_loop().create_task(self._welcome(client))

    async def _welcome(self, client: Client) -> None:
        """Subscribe to the user's pushes, then greet; frames sent before wait."""
        identity = client.identity
        if self.on_connection is not None:
            try:
                client.watched = True  # balanced in _disconnected whatever happens
                await self.on_connection(identity.user)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("no push subscription for %s: %r", identity.user, exc)
                client.close(WSCloseCode.INTERNAL_ERROR, "pushes unavailable; reconnect")
                return
        welcome = Welcome(
            user=identity.user,
            role=identity.role,
            protocol=PROTOCOL_VERSION,
            server_time=time.time_ns() // 1_000_000,
        )
        data = client.codec.encode(welcome)
        client.unsent[:0] = [_frame_header(client.opcode, len(data)), data]  # before any push
        client.ready = True
        client.flush()
        client.release()

    def _disconnected(self, client: Client) -> None:
        if client not in self._all:
            return
        self._all.discard(client)
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

    def _receive(self, client: Client, message: bytes | str) -> None:
        client.took()
        try:
            self._dispatch(client, message)
        except Exception:
            log.exception("bug while dispatching a request of %s", client.identity.user)
            error = RequestError(ErrorCode.INTERNAL, "internal error")
            self._reply_now(client, client.codec.encode_error(None, error))

    # --------------------------------------------------------------- routing

    def _reply_now(self, client: Client, data: bytes) -> None:
        client.answered()
        client.send(data)

    def _refuse(
        self, client: Client, rid: str | int | None, error: RequestError, kind: str = "unknown"
    ) -> None:
        self.metrics.count(kind, error.code.value)
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
                self.metrics.count("categories", "ok")
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
        binary = client.codec.binary
        started = time.perf_counter()

        def done(data: bytes) -> None:
            self._reply_now(client, data if binary else _transcode(data))
            outcome = _outcome.decode(data)
            self.metrics.count(kind, outcome.code or "ok")
            self.metrics.timed(kind, time.perf_counter() - started)

        try:
            self._backend.submit(user, request, done)  # type: ignore[arg-type]
        except ShardBusy:
            error = RequestError(ErrorCode.UNAVAILABLE, "the server is overloaded; retry")
            return self._refuse(client, request.rid, error, kind)

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
        self.metrics.count("catalog", "ok")
        self._reply_now(client, client.codec.encode(reply))

    def _count_bad_frame(self, client: Client) -> None:
        now = time.monotonic()
        client.bad.append(now)
        while client.bad and now - client.bad[0] > GatewayLimits.bad_frame_window:
            client.bad.popleft()
        if len(client.bad) > GatewayLimits.bad_frames:
            log.info("closing %s: too many bad frames", client.identity.user)
            self.metrics.disconnects.labels("bad_frames").inc()
            client.close(WSCloseCode.POLICY_VIOLATION, "too many bad frames")

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
        encoded = {c: codec_for(c).encode(message) for c in _SUBPROTOCOLS}
        for client in list(self._all):
            client.send(encoded[client.codec.subprotocol])


def _forbidden(what: str) -> RequestError:
    return RequestError(ErrorCode.FORBIDDEN, f"this token's role may not {what}")


def _bearer(value: str | None) -> str | None:
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _pick_subprotocol(offers: list[str]) -> str | None:
    """The first subprotocol the client offers that we speak (JSON without one)."""
    for header in offers:
        for name in header.split(","):
            if name.strip() in _SUBPROTOCOLS:
                return name.strip()
    return None


def _plain(response: WSUpgradeResponse) -> WSUpgradeResponseWithListener:
    return WSUpgradeResponseWithListener(response, None)


def _error(
    status: HTTPStatus, text: str, headers: dict[str, str] | None = None
) -> WSUpgradeResponseWithListener:
    response = WSUpgradeResponse.create_error_response(status, f"{text}\n".encode(), headers)
    return _plain(response)
