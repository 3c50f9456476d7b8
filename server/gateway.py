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
  socket read brought in.  A request refused ``rate_limited`` does the same
  until its ``retry_after_ms`` is over (``Client.throttle``): a flood waits in
  TCP rather than taking the event loop from other users.
* Writes go straight to the socket.  A client that stops reading while its
  unsent bytes pass a bound is closed with 1008, not buffered without end.
* Slow and silent clients: the HTTP request must be complete within the
  handshake timeout, and a connection from which no frame comes for the idle
  timeout is closed (``GatewayLimits`` says what idle means).

The handshake checks the path, the token (HTTP 401 without a good one), the
connection limit (503) and the limit per client address (429; the address
comes from ``server.admission``), and picks the subprotocol; ``/healthz`` and
``/readyz`` are answered as plain HTTP on the same port.  ``/metrics`` is
not: it lives on the operators' HTTP port (server/http.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
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
    Unwatch,
    Watch,
    Welcome,
)
from protocol.messages import (
    Catalog as CatalogRequest,
)
from protocol.money import Refund, RetryOrder, ShipOrder
from server.admission import serve_websockets
from server.auth import AuthError, Identity, verify_token
from server.batching import Backend, ShardBusy
from server.metrics import Metrics
from server.ratelimit import RateLimiter
from server.watching import Watcher, Watches

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
#: The outcomes ``/metrics`` counts: a closed set, so that no field of a reply
#: (a promo code in ``redeemed``) becomes a label value.
_ERROR_OUTCOMES = frozenset(code.value for code in ErrorCode)


def _outcome_of(data: bytes) -> str:
    """A shard's reply as a metrics outcome: ``ok``, or its error code."""
    outcome = _outcome.decode(data)
    if outcome.type != "error":
        return "ok"
    return outcome.code if outcome.code in _ERROR_OUTCOMES else "other"


@dataclass(frozen=True)
class GatewayLimits:
    """What one gateway allows a connection, and how long it waits for one.

    *Idle* means that no complete frame of any kind (a request, a ping, a
    pong, a close) has arrived for ``idle_timeout`` seconds.  A connection
    that sends nothing for ``ping_interval`` seconds is pinged, and every
    WebSocket client answers pings by itself, so a live client however quiet
    is never idle; a peer that vanished without a FIN stops answering and
    picows closes it ``ping_interval`` after the ping.  What the idle timeout
    catches besides is a peer that keeps the socket busy without ever
    finishing a frame (a frame trickled a byte at a time): any incoming byte
    puts the ping off, so nothing else would close it.  Idle connections are
    closed with 1001.
    """

    in_flight: int = 256  # requests per connection awaiting a reply; then stop reading
    send_buffer: int = 1024 * 1024  # unsent bytes per connection; then hang up
    fragments: int = 1024  # frames in one fragmented message, then close 1008
    close_timeout: float = 5.0  # after our close frame, for the client's, then hang up
    bad_frames: int = 10  # per bad_frame_window, then close 1008 (PROTOCOL.md §5)
    bad_frame_window: float = 60.0
    handshake_timeout: float = 10.0  # from TCP connect to the end of the HTTP request
    ping_interval: float = 20.0  # an idle connection is pinged; no pong in time closes it
    idle_timeout: float = 60.0  # no frame at all, not even a pong, this long: close 1001
    per_address: int = 1000  # open WebSockets per client address (an IPv6 /64); then 429
    throttle_limit: float = 1.0  # longest pause in reading after a rate_limited refusal
    watch: int = 10_000  # users one connection may watch (PROTOCOL.md §11); then limit_exceeded

    def __post_init__(self) -> None:
        if self.idle_timeout <= self.ping_interval:
            # A quiet client is pinged only after ping_interval: its pong must
            # be able to arrive before the idle timeout, or live clients are closed.
            raise ValueError("idle_timeout must be longer than ping_interval")


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

    def __init__(self, gateway: Gateway, identity: Identity, codec: Codec, address: str) -> None:
        super().__init__()
        self.gateway = gateway
        self.limits = gateway.limits
        self.identity = identity
        self.codec = codec
        #: Where the connection comes from, as counted by the per-address limit.
        self.address = address
        #: When the last complete frame of any kind arrived (``GatewayLimits``, idle).
        self.last_frame = time.monotonic()
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
        #: Refused ``rate_limited``: nothing more is read until its wait is over.
        self.throttled = False
        self.writing_paused = False
        self.closing = False
        #: A message arriving in several frames: its kind and its parts so far.
        self.parts: list[bytes] = []
        self.parts_size = 0
        self.parts_kind = WSMsgType.CONTINUATION
        self.bad: deque[float] = deque()
        self.watched = False
        #: The users this connection watches (``server.watching``), once it does.
        self.watcher: Watcher | None = None
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

    def is_user_specific_pong(self, frame: WSFrame) -> bool:
        """picows asks this, instead of calling ``on_ws_frame``, about every
        frame that arrives while it waits for the pong of its ping."""
        self.last_frame = time.monotonic()
        return frame.msg_type is WSMsgType.PONG

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self.last_frame = time.monotonic()
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
        if self.held or not self.ready or self.throttled or self.in_flight >= self.limits.in_flight:
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
        if len(self.parts) > self.limits.fragments:
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
        if self.writing_paused and socket.get_write_buffer_size() > self.limits.send_buffer:
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
            self.limits.close_timeout, transport.disconnect, False
        )

    # ----------------------------------------------------------- flow control

    def took(self) -> None:
        self.in_flight += 1
        if self.in_flight >= self.limits.in_flight:
            self._pause_reading()

    def answered(self) -> None:
        self.in_flight -= 1
        if self.held:
            self.release()
        elif self.reading_paused and self.in_flight < self.limits.in_flight // 2:
            self._resume_reading()

    def release(self) -> None:
        """Dispatch held frames, in order, while the in-flight limit allows."""
        if self.releasing or not self.ready:
            return  # the loop below is already running, further up the stack
        self.releasing = True
        try:
            while (
                self.held
                and self.in_flight < self.limits.in_flight
                and not self.closing
                and not self.throttled
            ):
                self.gateway._receive(self, self.held.popleft())
        finally:
            self.releasing = False
        if not self.held and self.in_flight < self.limits.in_flight:
            self._resume_reading()

    def throttle(self, wait_ms: int) -> None:
        """Stop reading for ``wait_ms`` (at most ``throttle_limit``): the user is
        over the rate limit.

        Refusing costs the gateway about what serving costs, so a client that
        keeps sending while refused would take the event loop from everyone
        else.  Its frames wait in TCP instead, and TCP pushes back on it; when
        the wait is over, what it sent is dispatched in order (and refused
        again if it is still too much)."""
        if self.throttled or self.closing:
            return
        self.throttled = True
        self._pause_reading()
        delay = min(wait_ms / 1000, self.limits.throttle_limit)
        asyncio.get_running_loop().call_later(delay, self._unthrottle)

    def _unthrottle(self) -> None:
        self.throttled = False
        self.release()

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closing:
            self.reading_paused = True
            self.transport.underlying_transport.pause_reading()

    def _resume_reading(self) -> None:
        if (
            self.reading_paused
            and not self.throttled
            and self.transport is not None
            and not self.closing
        ):
            self.reading_paused = False
            self.last_frame = time.monotonic()  # the pause was ours, not idleness
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
        limits: GatewayLimits | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.limits = limits or GatewayLimits()
        #: Units left of limited items (kept current from Redis by the app).
        self.stock_left: dict[str, int] = {}
        self._secret = secret
        self._max_connections = max_connections
        self.connections = 0
        self._backend = backend
        self._catalog = catalog
        self._limiter = limiter
        self.clients: dict[str, set[Client]] = {}
        #: Match servers' watches (PROTOCOL.md §11); the app gives it Redis.
        self.watches = Watches(backend, self.limits.watch, self.metrics)
        self.on_connection: Callable[[str], Awaitable[None]] | None = None
        self.on_disconnect: Callable[[str], None] = lambda user: None
        #: ``/readyz``: ready or not, and the JSON body (server/readiness.py).
        self.readiness: Callable[[], tuple[bool, bytes]] = lambda: (True, b"{}\n")
        #: The user of an order (PROTOCOL.md §12 operator requests); the app sets it.
        self.order_owner: Callable[[str], Awaitable[str | None]] | None = None
        self._lookups: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._all: set[Client] = set()
        #: Open connections per client address (``server.admission.address_key``).
        self.per_address: dict[str, int] = {}
        self._unflushed: list[Client] = []
        self._idle_check: asyncio.TimerHandle | None = None
        self._refusal_logged = 0.0
        self.draining = False

    # --------------------------------------------------------------- serving

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> asyncio.Server:
        picows_log = logging.getLogger("picows")
        if picows_log.level == logging.NOTSET:  # it logs every connection at INFO
            picows_log.setLevel(logging.WARNING)
        self._server = await serve_websockets(
            self._upgrade,
            host,
            port,
            handshake_timeout=self.limits.handshake_timeout,
            ping_interval=self.limits.ping_interval,
            max_frame=MAX_FRAME,
            reuse_port=reuse_port,
            logger=logging.getLogger("picows.loadout.ws"),
        )
        self._schedule_idle_check()
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
        if self._idle_check is not None:
            self._idle_check.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 10)

    def _upgrade(self, request: WSUpgradeRequest, address: str) -> WSUpgradeResponseWithListener:
        """Route an HTTP request: a WebSocket for a good token, else a response.

        ``address`` is the client's (``server.admission.address_key``)."""
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
        if self.per_address.get(address, 0) >= self.limits.per_address:
            return self._refuse_address(address)
        token = _bearer(request.headers.get("Authorization"))
        if token is None:
            tokens = parse_qs(url.query).get("token")
            token = tokens[0] if tokens else None
        try:
            identity = verify_token(self._secret, token or "")
        except AuthError as exc:
            log.info("refused a handshake: %s", exc)
            # Which fault (missing, expired, forged...), never the token's content.
            challenge = {"WWW-Authenticate": 'Bearer realm="loadout"'}
            return _error(HTTPStatus.UNAUTHORIZED, f"unauthorized: {exc.problem}", challenge)
        subprotocol = _pick_subprotocol(request.headers.getall("Sec-WebSocket-Protocol", []))
        headers = {"Sec-WebSocket-Protocol": subprotocol} if subprotocol else None
        client = Client(self, identity, codec_for(subprotocol), address)
        return WSUpgradeResponseWithListener(WSUpgradeResponse.create_101_response(headers), client)

    def _refuse_address(self, address: str) -> WSUpgradeResponseWithListener:
        """429: this address holds ``GatewayLimits.per_address`` connections.

        Logged at most once a second: a client that retries in a loop must
        not flood the log as well."""
        self.metrics.refused.labels("per_address").inc()
        now = time.monotonic()
        if now - self._refusal_logged >= 1.0:
            self._refusal_logged = now
            log.warning("refused a connection from %s: %d open (the limit)",
                        address or "a local socket", self.per_address.get(address, 0))  # fmt: skip
        return _error(HTTPStatus.TOO_MANY_REQUESTS, "too many connections from your address")

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
        self.per_address[client.address] = self.per_address.get(client.address, 0) + 1
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
        left = self.per_address[client.address] - 1
        if left:
            self.per_address[client.address] = left
        else:
            del self.per_address[client.address]
        self.connections -= 1
        self.metrics.connections.dec()
        if client.watched:
            self.on_disconnect(client.identity.user)
        if client.watcher is not None:
            self.watches.end(client.watcher)
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
            client.throttle(wait)  # first: the refusal below must not release held frames
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
            case Grant() | Refund() | RetryOrder() | ShipOrder() if identity.role is not Role.ADMIN:
                kind = request.__struct_config__.tag
                return self._refuse(client, request.rid, _forbidden(str(kind)), str(kind))
            case Inspect() if identity.role is Role.PLAYER:
                return self._refuse(client, request.rid, _forbidden("inspect"), "inspect")
            case Watch() | Unwatch() if identity.role is Role.PLAYER:
                return self._refuse(client, request.rid, _forbidden("watch"), "watch")
            case Watch():
                return self.watches.watch(self._watcher(client), request)
            case Unwatch():
                return self.watches.unwatch(self._watcher(client), request)
            case RetryOrder() | ShipOrder():
                return self._route_order(client, request)
            case Grant() | Inspect() | Refund():
                user = request.user
            case _:
                user = identity.user
        self._route(client, user, request)

    def _watcher(self, client: Client) -> Watcher:
        if client.watcher is None:
            reply = functools.partial(self._reply_now, client)
            client.watcher = Watcher(client.codec, client.send, reply)
        return client.watcher

    def _route(self, client: Client, user: str, request: ClientMessage) -> None:
        kind: str = request.__struct_config__.tag  # type: ignore[assignment]
        binary = client.codec.binary
        started = time.perf_counter()

        def done(data: bytes) -> None:
            self._reply_now(client, data if binary else _transcode(data))
            self.metrics.count(kind, _outcome_of(data))
            self.metrics.timed(kind, time.perf_counter() - started)

        try:
            self._backend.submit(user, request, done)  # type: ignore[arg-type]
        except ShardBusy:
            error = RequestError(ErrorCode.UNAVAILABLE, "the server is overloaded; retry")
            return self._refuse(client, request.rid, error, kind)

    def _route_order(self, client: Client, request: RetryOrder | ShipOrder) -> None:
        """An operator's order request names the order, not its user: find the
        user, then route as usual."""

        async def route() -> None:
            owner = None if self.order_owner is None else await self.order_owner(request.order)
            if owner is None:
                error = RequestError(ErrorCode.UNKNOWN_ORDER, f"no order {request.order!r}")
                return self._refuse(client, request.rid, error, str(request.__struct_config__.tag))
            self._route(client, owner, request)

        task = asyncio.get_running_loop().create_task(route())
        self._lookups.add(task)
        task.add_done_callback(self._lookups.discard)

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
        while client.bad and now - client.bad[0] > self.limits.bad_frame_window:
            client.bad.popleft()
        if len(client.bad) > self.limits.bad_frames:
            log.info("closing %s: too many bad frames", client.identity.user)
            self.metrics.disconnects.labels("bad_frames").inc()
            client.close(WSCloseCode.POLICY_VIOLATION, "too many bad frames")

    def _schedule_idle_check(self) -> None:
        """Check for idle connections a few times per ``idle_timeout``."""
        period = self.limits.idle_timeout / 4
        loop = asyncio.get_running_loop()
        self._idle_check = loop.call_later(period, self._close_idle)

    def _close_idle(self) -> None:
        """Close connections from which no frame came for ``idle_timeout``
        (``GatewayLimits`` says what idle means and why pings do not suffice)."""
        deadline = time.monotonic() - self.limits.idle_timeout
        # A connection whose reading we paused (requests in flight) is not idle
        # by its own doing: what it sent waits in the socket.
        idle = [
            c
            for c in self._all
            if c.last_frame < deadline and not c.closing and not c.reading_paused
        ]
        for client in idle:
            log.info("closing %s: idle", client.identity.user)
            self.metrics.disconnects.labels("idle").inc()
            client.close(WSCloseCode.GOING_AWAY, "idle")
        self._schedule_idle_check()

    # ----------------------------------------------------------------- pushes

    def deliver(self, user: str, data: bytes) -> None:
        """A push for ``user`` from Redis: to every connection of theirs here,
        and to the connections watching them."""
        self.watches.deliver(user, data)
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
