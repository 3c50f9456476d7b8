"""The load generator's side of the wire: what a worker is told to do and
what it measures, its WebSocket connections (picows listeners: a frame is
handled in picows' frame callback, with no reader task), and the state they
share, which matches replies to requests and pushes to changes.

``bench.load`` drives these connections; ``bench.watch`` opens the service
connections that watch users (PROTOCOL.md §11)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    ws_connect,
)

__all__ = [
    "CHANGES",
    "DRAIN_SECONDS",
    "FRAME_PRICE",
    "FRAME_SKU",
    "FRAME_SLOT",
    "KINDS",
    "PRICE",
    "PROFILE",
    "SKU",
    "Conn",
    "Run",
    "SetupRequest",
    "Slot",
    "WorkerPlan",
    "WorkerResult",
    "close_all",
    "open_conn",
    "open_many",
]

SKU, PRICE = "plat.booster.xp", 5
FRAME_SKU, FRAME_PRICE, FRAME_SLOT, PROFILE = "plat.frame.gold", 200, "frame", "main"
KINDS = ("purchase", "equip", "unequip", "state")
#: The requests that change a user (and so are pushed to the user's watchers).
CHANGES = frozenset(("purchase", "equip", "unequip"))
SUBPROTOCOL = "loadout.v1.msgpack"
DRAIN_SECONDS = 10.0


@dataclass
class WorkerPlan:
    """What one load-generator process does (picklable)."""

    index: int
    url: str
    tokens: dict[str, str]  # user -> token, for every user below
    cold: list[str]
    hot: list[str]
    watched: list[str]
    depth: int
    rate: float | None  # offered requests/s for this worker, open loop
    warmup: float
    duration: float
    mix: tuple[float, float, float]  # purchase, equip/unequip, state
    hot_share: float  # of purchases, sent to hot users
    run_id: str
    seed: int
    #: Paced (``--pace``): each connection sends a request every ``pace``
    #: seconds on average (uniformly 0.5x to 1.5x, a game's rhythm).
    pace: float | None = None
    #: Service connections of this worker (one token each) that ``watch``
    #: ``watch_users`` (PROTOCOL.md §11), split among them.
    service_tokens: list[str] = field(default_factory=list)
    watch_users: list[str] = field(default_factory=list)
    #: Connections being opened at once (the rest wait their turn).
    connect_window: int = 200


@dataclass
class WorkerResult:
    """Raw measurements of one worker, merged by ``bench.report``."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    push_latencies: list[float] = field(default_factory=list)
    ok: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # "kind:code"
    sent: int = 0
    late_sends: int = 0  # open loop: sends more than 1 ms behind schedule
    unanswered: int = 0
    missing_pushes: int = 0
    setup_errors: list[str] = field(default_factory=list)
    timeline: Counter[int] = field(default_factory=Counter)  # second -> ok replies arrived
    measured_seconds: float = 0.0
    #: Service watchers: from a change's send, and from its reply's arrival,
    #: to its push on the watcher (ms; the second is negative when the push
    #: came first); changes whose push the watcher never got.
    watch_latencies: list[float] = field(default_factory=list)
    watch_after_reply: list[float] = field(default_factory=list)
    missing_watch_pushes: int = 0
    #: Connections: opened, failed, and how long opening them all took.
    connected: int = 0
    connect_failures: int = 0
    connect_seconds: float = 0.0
    #: This process over the load (warm-up and window): CPU seconds, wall
    #: seconds, and its resident memory at the end.
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    rss_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "latencies": dict(self.latencies),
            "push_latencies": self.push_latencies,
            "ok": dict(self.ok),
            "errors": dict(self.errors),
            "sent": self.sent,
            "late_sends": self.late_sends,
            "unanswered": self.unanswered,
            "missing_pushes": self.missing_pushes,
            "setup_errors": self.setup_errors,
            "timeline": dict(self.timeline),
            "measured_seconds": self.measured_seconds,
            "watch_latencies": self.watch_latencies,
            "watch_after_reply": self.watch_after_reply,
            "missing_watch_pushes": self.missing_watch_pushes,
            "connected": self.connected,
            "connect_failures": self.connect_failures,
            "connect_seconds": self.connect_seconds,
            "cpu_seconds": self.cpu_seconds,
            "wall_seconds": self.wall_seconds,
            "rss_bytes": self.rss_bytes,
        }


class Message(msgspec.Struct):
    """What the load generator reads of a server message."""

    type: str
    rid: int | None = None
    code: str | None = None
    version: int | None = None
    user: str | None = None  # pushes to watchers carry it


_decode = msgspec.msgpack.Decoder(Message).decode
_encode = msgspec.msgpack.Encoder().encode


class Slot:
    """What waits for a request's reply: a driver's slot, or the set-up purchase.

    ``free`` is called once per request: from the frame callback of its reply,
    or when the reply is lost with its connection."""

    def free(self) -> None:
        raise NotImplementedError


Record = tuple[str, float, float, Slot | None]  # kind, scheduled, sent, who waits


class SetupRequest(Slot):
    """A request made before the load (not measured): its reply's type, or
    ``error:<code>``, is in ``answer`` once ``done``; None if the connection
    was lost."""

    def __init__(self) -> None:
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.answer: str | None = None

    def free(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class Conn(WSListener):
    """One WebSocket: sends requests, matches replies by rid, notices pushes.

    picows calls ``on_ws_frame`` for each frame as it reads it; there is no
    reader task."""

    transport: WSTransport  # set by picows before the first frame

    def __init__(self, user: str, run: Run) -> None:
        super().__init__()
        self.user = user
        self.run = run
        self.pending: dict[int, Record] = {}
        self.welcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.closed = False
        self._fragments: bytearray | None = None

    def send(self, kind: str, body: dict[str, Any], scheduled: float, slot: Slot | None) -> None:
        rid = self.run.next_rid()
        body["rid"] = rid
        record = (kind, scheduled, time.perf_counter(), slot)
        if self.closed:
            self.run.lost.append(record)
            if slot is not None:
                slot.free()
            return
        self.pending[rid] = record
        self.transport.send(WSMsgType.BINARY, _encode(body))

    def close(self) -> None:
        """Start the closing handshake; the server's CLOSE frame finishes it."""
        if not self.closed:
            self.transport.send_close(WSCloseCode.OK)

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        # An exception here (a frame that does not decode) makes picows drop the
        # connection: its requests then count as unanswered.
        now = time.perf_counter()
        if frame.msg_type == WSMsgType.BINARY and frame.fin:
            message = _decode(frame.get_payload_as_memoryview())
        else:
            data = self._other_frame(transport, frame)
            if data is None:
                return
            message = _decode(data)
        if message.rid is None:
            if not self.welcome.done():  # the first message
                self.welcome.set_result(message.type)
            elif message.version is None:
                pass
            elif message.user is not None:  # a push to a service watcher
                self.run.watch_push_arrived(message.user, message.version, now)
            elif message.type == "inventory":
                self.run.push_arrived(self.user, message.version, now)
            return
        record = self.pending.pop(message.rid, None)
        if record is not None:
            self.run.reply_arrived(self.user, record, message, now)

    def _other_frame(self, transport: WSTransport, frame: WSFrame) -> bytes | None:
        """A CLOSE, or part of a fragmented message (the whole message once its
        last fragment is in).  The server sends neither text nor fragments; they
        are put up with, not expected."""
        msg_type = frame.msg_type
        if msg_type == WSMsgType.CLOSE:
            if not transport.is_close_frame_sent:
                transport.send_close(WSCloseCode.OK)
            transport.disconnect()
        elif msg_type == WSMsgType.BINARY:  # the first fragment
            self._fragments = bytearray(frame.get_payload_as_memoryview())
        elif msg_type == WSMsgType.CONTINUATION and self._fragments is not None:
            self._fragments += frame.get_payload_as_memoryview()
            if frame.fin:
                data, self._fragments = bytes(self._fragments), None
                return data
        elif msg_type == WSMsgType.TEXT:
            self._fragments = None
        return None

    def pause_writing(self) -> None:
        """Requests go on being queued: in an open loop, time spent in the
        queue counts in the latency, which runs from the scheduled send."""

    def resume_writing(self) -> None:
        pass

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True
        if not self.welcome.done():
            self.welcome.set_exception(ConnectionError("closed before the welcome"))
        self.run.connection_lost(self)


class Driver(Protocol):
    """What drives one connection's requests (``bench.load``)."""

    def start(self) -> None: ...


class Run:
    """State shared by every connection of a worker."""

    def __init__(self, plan: WorkerPlan, result: WorkerResult) -> None:
        self.plan = plan
        self.result = result
        self._rid = 0
        self.start = 0.0
        self.measure_from = 0.0
        self.measure_to = 0.0
        self.stopping = False
        self.watched = set(plan.watched)
        self.watchers: dict[str, Conn] = {}
        self.pushes_seen: dict[tuple[str, int], float] = {}
        self.purchases_seen: dict[tuple[str, int], float] = {}
        #: Service watchers: the users watched, each change (user, version)
        #: seen replied to (its send and reply times) and each push seen
        #: first, until the other half comes.
        self.watch_users = set(plan.watch_users)
        self.changes_seen: dict[tuple[str, int], tuple[float, float]] = {}
        self.watch_pushes_seen: dict[tuple[str, int], float] = {}
        self.progress = 0
        self.lost: list[Record] = []  # requests whose connection was lost
        self.driving = 0
        self.driven: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def next_rid(self) -> int:
        self._rid += 1
        return self._rid

    def measured(self, scheduled: float) -> bool:
        return self.measure_from <= scheduled < self.measure_to

    def reply_arrived(self, user: str, record: Record, message: Message, now: float) -> None:
        kind, scheduled, sent, slot = record
        if isinstance(slot, SetupRequest):
            ok = message.type != "error"
            slot.answer = message.type if ok else f"error:{message.code}"
        if kind != "setup":
            self.progress += 1
            result = self.result
            ok = message.type != "error"
            if ok and self.measure_from <= now:  # by arrival time, whenever it was sent
                result.timeline[int(now - self.measure_from)] += 1
            if self.measured(scheduled):
                if ok:
                    result.ok[kind] += 1
                    result.latencies[kind].append((now - scheduled) * 1000)
                else:
                    result.errors[f"{kind}:{message.code}"] += 1
            if ok and kind == "purchase" and user in self.watched and message.version is not None:
                key = (user, message.version)
                pushed = self.pushes_seen.pop(key, None)
                if pushed is not None:
                    self._push_latency(sent, pushed)
                else:
                    self.purchases_seen[key] = sent
            if (
                ok and kind in CHANGES and user in self.watch_users
                and message.version is not None and self.measured(scheduled)
            ):  # fmt: skip
                self._change_replied(user, message.version, sent, now)
        if slot is not None:
            slot.free()  # a closed loop sends its next request now

    def push_arrived(self, user: str, version: int, now: float) -> None:
        if user not in self.watched:
            return
        key = (user, version)
        if self.watchers.get(user) is None:
            return
        sent = self.purchases_seen.pop(key, None)
        if sent is not None:
            self._push_latency(sent, now)
        else:
            self.pushes_seen[key] = now

    def _change_replied(self, user: str, version: int, sent: float, replied: float) -> None:
        key = (user, version)
        pushed = self.watch_pushes_seen.pop(key, None)
        if pushed is not None:
            self._watch_latency(sent, replied, pushed)
        else:
            self.changes_seen[key] = (sent, replied)

    def watch_push_arrived(self, user: str, version: int, now: float) -> None:
        """A push of ``user`` at ``version`` reached a service watcher."""
        key = (user, version)
        change = self.changes_seen.pop(key, None)
        if change is not None:
            self._watch_latency(*change, now)
        elif user in self.watch_users:
            # A second push of one change (``inventory`` and ``loadout``) keeps
            # the first one's time: the change reached the watcher then.
            self.watch_pushes_seen.setdefault(key, now)

    def _watch_latency(self, sent: float, replied: float, pushed: float) -> None:
        """A measured change (scheduled in the window, as the requests counted)."""
        self.result.watch_latencies.append((pushed - sent) * 1000)
        self.result.watch_after_reply.append((pushed - replied) * 1000)

    def _push_latency(self, sent: float, pushed: float) -> None:
        if self.measured(sent):
            self.result.push_latencies.append((pushed - sent) * 1000)

    def connection_lost(self, conn: Conn) -> None:
        """The requests waiting on ``conn`` will not be answered: free their slots."""
        records = list(conn.pending.values())
        conn.pending.clear()
        self.lost.extend(records)
        for _, _, _, slot in records:
            if slot is not None:
                slot.free()

    async def drive(self, drivers: Sequence[Driver]) -> None:
        """Start the drivers; return once they all stopped at the end of the
        window, or at the end of the drain time after it (a reply never came)."""
        self.driving = len(drivers)
        if not drivers:
            return
        for driver in drivers:
            driver.start()
        timeout = self.measure_to + DRAIN_SECONDS - time.perf_counter()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.driven, max(0.0, timeout))

    def driver_finished(self) -> None:
        self.driving -= 1
        if self.driving == 0 and not self.driven.done():
            self.driven.set_result(None)


async def open_conn(url: str, user: str, token: str, run: Run) -> Conn:
    conn = Conn(user, run)

    def listener(request: WSUpgradeRequest, response: WSUpgradeResponse) -> Conn:
        chosen = response.headers.get("Sec-WebSocket-Protocol")
        if chosen != SUBPROTOCOL:
            raise RuntimeError(f"the server chose subprotocol {chosen!r} for {user}")
        return conn

    headers = {"Authorization": f"Bearer {token}", "Sec-WebSocket-Protocol": SUBPROTOCOL}
    connecting = ws_connect(
        listener, url, extra_headers=headers, websocket_handshake_timeout=30, max_frame_size=2**20
    )
    await asyncio.wait_for(connecting, 30)
    try:
        welcome = await asyncio.wait_for(conn.welcome, 30)
        if welcome != "welcome":
            raise RuntimeError(f"expected a welcome for {user}, got {welcome}")
    except BaseException:
        conn.transport.disconnect(graceful=False)
        raise
    return conn


async def open_many(
    url: str, tokens: Sequence[tuple[str, str]], run: Run, window: int
) -> tuple[dict[str, Conn], list[str]]:
    """Open a connection per (name, token), ``window`` at a time (a burst of
    thousands of handshakes would overflow the server's listen backlog and
    wait out SYN retries); the connections, and what failed and why."""
    gate = asyncio.Semaphore(max(1, window))

    async def one(name: str, token: str) -> Conn:
        async with gate:
            return await open_conn(url, name, token, run)

    opened = await asyncio.gather(*(one(n, t) for n, t in tokens), return_exceptions=True)
    conns: dict[str, Conn] = {}
    failures: list[str] = []
    for (name, _), conn in zip(tokens, opened, strict=True):
        if isinstance(conn, BaseException):
            failures.append(f"connect {name}: {conn!r}")
        else:
            conns[name] = conn
    return conns, failures


async def close_all(conns: list[Conn]) -> None:
    """Closing handshakes, bounded in time; then whatever is left is cut."""
    for conn in conns:
        conn.close()
    waiting = asyncio.gather(
        *(c.transport.wait_disconnected() for c in conns), return_exceptions=True
    )
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(waiting, 5)
    for conn in conns:
        conn.transport.disconnect(graceful=False)
