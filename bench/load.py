"""The load generator: WebSocket clients that drive the request mix.

One ``worker`` runs in each load-generator process (``--procs``).  It opens
one MessagePack connection per *cold* user it was given (a connection acts
for its token's user), one connection per *hot* user it was given, and a
second, read-only *watcher* connection for a sample of its cold users.

Each cold connection drives the mix for its own user: a purchase of
``plat.booster.xp`` (a stackable consumable, unlimited), an equip or unequip
of ``plat.frame.gold`` in slot ``frame`` of profile ``main`` (alternating), or
a ``state``.  With ``--hot``, half of the purchases go instead to a hot user
(1% of the users), over that user's connection: the request still belongs to
the cold connection's driver, so depth and rate stay as configured.

* Closed loop (``depth``): each cold connection keeps ``depth`` requests in
  flight and sends the next one as soon as a reply arrives; latency is from
  send to reply.
* Open loop (``rate``): each cold connection sends on a fixed schedule (the
  offered rate split evenly, each with a random phase), whether or not replies
  came back; latency is from the *scheduled* send time, so a server (or a load
  generator) that falls behind shows its queueing instead of hiding it.

Push latency: for watched users, from the purchase's send time to the arrival
of the ``inventory`` push carrying the purchase's version on the watcher.

Only requests scheduled inside the measurement window count; requests whose
connection is lost count as unanswered.

The load generator shares the machine with the server under test, so each
microsecond it spends per request is taken from the server: it runs on picows,
with no task per frame or per request.  A connection handles each frame in
picows' frame callback (no reader task); there a reply frees its driver's slot,
and a closed loop sends its next request at once.  An open loop sends from a
timer callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
    "KINDS",
    "PRICE",
    "SKU",
    "WorkerPlan",
    "WorkerResult",
    "run_worker",
    "worker_process",
]

SKU, PRICE = "plat.booster.xp", 5
FRAME_SKU, FRAME_PRICE, FRAME_SLOT, PROFILE = "plat.frame.gold", 200, "frame", "main"
KINDS = ("purchase", "equip", "unequip", "state")
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
        }


class _Message(msgspec.Struct):
    """What the load generator reads of a server message."""

    type: str
    rid: int | None = None
    code: str | None = None
    version: int | None = None


_decode = msgspec.msgpack.Decoder(_Message).decode
_encode = msgspec.msgpack.Encoder().encode


class _Slot:
    """What waits for a request's reply: a driver's slot, or the set-up purchase.

    ``free`` is called once per request: from the frame callback of its reply,
    or when the reply is lost with its connection."""

    def free(self) -> None:
        raise NotImplementedError


_Record = tuple[str, float, float, _Slot | None]  # kind, scheduled, sent, who waits


class _SetupPurchase(_Slot):
    def __init__(self) -> None:
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def free(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class _Conn(WSListener):
    """One WebSocket: sends requests, matches replies by rid, notices pushes.

    picows calls ``on_ws_frame`` for each frame as it reads it; there is no
    reader task."""

    transport: WSTransport  # set by picows before the first frame

    def __init__(self, user: str, run: _Run) -> None:
        super().__init__()
        self.user = user
        self.run = run
        self.pending: dict[int, _Record] = {}
        self.welcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.closed = False
        self._fragments: bytearray | None = None

    def send(self, kind: str, body: dict[str, Any], scheduled: float, slot: _Slot | None) -> None:
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
            elif message.type == "inventory" and message.version is not None:
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


class _Run:
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
        self.watchers: dict[str, _Conn] = {}
        self.pushes_seen: dict[tuple[str, int], float] = {}
        self.purchases_seen: dict[tuple[str, int], float] = {}
        self.progress = 0
        self.lost: list[_Record] = []  # requests whose connection was lost
        self.driving = 0
        self.driven: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def next_rid(self) -> int:
        self._rid += 1
        return self._rid

    def measured(self, scheduled: float) -> bool:
        return self.measure_from <= scheduled < self.measure_to

    def reply_arrived(self, user: str, record: _Record, message: _Message, now: float) -> None:
        kind, scheduled, sent, slot = record
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

    def _push_latency(self, sent: float, pushed: float) -> None:
        if self.measured(sent):
            self.result.push_latencies.append((pushed - sent) * 1000)

    def connection_lost(self, conn: _Conn) -> None:
        """The requests waiting on ``conn`` will not be answered: free their slots."""
        records = list(conn.pending.values())
        conn.pending.clear()
        self.lost.extend(records)
        for _, _, _, slot in records:
            if slot is not None:
                slot.free()

    async def drive(self, drivers: list[_Driver]) -> None:
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


async def _open(url: str, user: str, token: str, run: _Run) -> _Conn:
    conn = _Conn(user, run)

    def listener(request: WSUpgradeRequest, response: WSUpgradeResponse) -> _Conn:
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


async def _close(conns: list[_Conn]) -> None:
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


async def _setup_frame(conn: _Conn, run: _Run) -> None:
    """Each cold user buys the frame once (idempotent key) so it can equip it."""
    setup = _SetupPurchase()
    body = {"type": "purchase", "key": "bench-frame", "sku": FRAME_SKU, "price": FRAME_PRICE}
    conn.send("setup", body, time.perf_counter(), setup)
    await asyncio.wait_for(setup.done, 60)
    if conn.closed:
        run.result.setup_errors.append(f"setup {conn.user}: connection lost")


def _chooser(plan: WorkerPlan, rng: random.Random) -> Callable[[], str]:
    purchase, equip, _ = plan.mix

    def choose() -> str:
        x = rng.random()
        if x < purchase:
            return "purchase"
        if x < purchase + equip:
            return "equip"
        return "state"

    return choose


async def run_worker(
    plan: WorkerPlan,
    ready: Callable[[], None] | None = None,
    report: Callable[[int], None] | None = None,
) -> WorkerResult:
    """Connect, set up, drive the load for warm-up + duration, and measure.

    ``ready`` is called once set up is done (the load starts right after);
    ``report`` gets the number of replies so far, four times a second."""
    result = WorkerResult()
    run = _Run(plan, result)
    rng = random.Random(plan.seed)
    conns: dict[str, _Conn] = {}
    ticker: asyncio.Task[None] | None = None
    if report is not None:
        ticker = asyncio.get_running_loop().create_task(_report(run, report))
    try:
        users = [*plan.cold, *plan.hot]
        opened = await asyncio.gather(
            *(_open(plan.url, u, plan.tokens[u], run) for u in users), return_exceptions=True
        )
        for user, conn in zip(users, opened, strict=True):
            if isinstance(conn, BaseException):
                result.setup_errors.append(f"connect {user}: {conn!r}")
            else:
                conns[user] = conn
        watchers = await asyncio.gather(
            *(_open(plan.url, u, plan.tokens[u], run) for u in plan.watched),
            return_exceptions=True,
        )
        for user, conn in zip(plan.watched, watchers, strict=True):
            if isinstance(conn, BaseException):
                result.setup_errors.append(f"watch {user}: {conn!r}")
            else:
                run.watchers[user] = conn
        await asyncio.gather(*(_setup_frame(conns[u], run) for u in plan.cold if u in conns))
        if ready is not None:
            ready()
        cold = [conns[u] for u in plan.cold if u in conns]
        hot = [conns[u] for u in plan.hot if u in conns]
        run.start = time.perf_counter()
        run.measure_from = run.start + plan.warmup
        run.measure_to = run.measure_from + plan.duration
        choose = _chooser(plan, rng)
        drivers: list[_Driver]
        if plan.rate:
            per_conn = plan.rate / max(1, len(cold))
            drivers = [_OpenLoop(c, hot, run, choose, rng, per_conn) for c in cold]
        else:
            drivers = [_ClosedLoop(c, hot, run, choose, rng) for c in cold]
        await run.drive(drivers)
        result.measured_seconds = plan.duration
        deadline = time.perf_counter() + DRAIN_SECONDS
        while time.perf_counter() < deadline and any(c.pending for c in conns.values()):  # noqa: ASYNC110 - polls many dicts
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # the last pushes
        waiting = [record for c in conns.values() for record in c.pending.values()]
        result.unanswered = sum(1 for _, s, _, _ in [*waiting, *run.lost] if run.measured(s))
        result.missing_pushes = sum(1 for _, v in run.purchases_seen.items() if run.measured(v))
    finally:
        if ticker is not None:
            ticker.cancel()
        await _close([*conns.values(), *run.watchers.values()])
    return result


class _Driver(_Slot):
    """A cold connection's driver: it sends the mix for its user until the end
    of the window, and frees a slot when a reply comes (or is lost)."""

    def __init__(
        self, conn: _Conn, hot: list[_Conn], run: _Run, choose: Callable[[], str],
        rng: random.Random,
    ) -> None:  # fmt: skip
        self.conn = conn
        self.hot = hot
        self.run = run
        self.choose = choose
        self.rng = rng
        self.equipped = False
        self.finished = False

    def start(self) -> None:
        raise NotImplementedError

    def _send(self, scheduled: float) -> None:
        target, kind, body = _request(self.conn, self.hot, self.run, self.choose, self, self.rng)
        self.run.result.sent += 1
        target.send(kind, body, scheduled, self)

    def _finish(self) -> None:
        self.finished = True
        self.run.driver_finished()


class _ClosedLoop(_Driver):
    """Keeps ``depth`` requests in flight: each reply frees a slot, and the next
    request goes out at once, from the reply's frame callback."""

    def __init__(
        self, conn: _Conn, hot: list[_Conn], run: _Run, choose: Callable[[], str],
        rng: random.Random,
    ) -> None:  # fmt: skip
        super().__init__(conn, hot, run, choose, rng)
        self.freed = run.plan.depth
        self.sending = False

    def start(self) -> None:
        self._send_freed()

    def free(self) -> None:
        self.freed += 1
        if not self.sending:  # else the loop below takes it (a lost connection's request)
            self._send_freed()

    def _send_freed(self) -> None:
        if self.finished:
            return
        self.sending = True
        try:
            while self.freed:
                self.freed -= 1
                now = time.perf_counter()
                if now >= self.run.measure_to or self.conn.closed:
                    self._finish()
                    return
                self._send(now)
        finally:
            self.sending = False


class _OpenLoop(_Driver):
    """Sends on a fixed schedule, from a timer, whether or not replies came back."""

    def __init__(
        self, conn: _Conn, hot: list[_Conn], run: _Run, choose: Callable[[], str],
        rng: random.Random, rate: float,
    ) -> None:  # fmt: skip
        super().__init__(conn, hot, run, choose, rng)
        self.interval = 1.0 / rate
        self.due = run.start + rng.random() * self.interval
        self.loop = asyncio.get_running_loop()

    def free(self) -> None:
        """Replies do not pace an open loop."""

    def start(self) -> None:
        self._send_due(woken=False)

    def _wake(self) -> None:
        self._send_due(woken=True)

    def _send_due(self, woken: bool) -> None:
        run = self.run
        while self.due < run.measure_to:
            if not woken:
                now = time.perf_counter()
                if self.due > now:
                    self.loop.call_later(self.due - now, self._wake)
                    return
                if now - self.due > 0.001:
                    run.result.late_sends += 1
            woken = False
            self._send(self.due)
            self.due += self.interval
        self._finish()


def _request(
    conn: _Conn, hot: list[_Conn], run: _Run, choose: Callable[[], str], driver: _Driver,
    rng: random.Random,
) -> tuple[_Conn, str, dict[str, Any]]:  # fmt: skip
    kind = choose()
    if kind == "purchase":
        target = conn
        if hot and rng.random() < run.plan.hot_share:
            target = hot[rng.randrange(len(hot))]
        key = f"{run.plan.run_id}.{run.plan.index}.{run._rid + 1}"
        return target, kind, {"type": "purchase", "key": key, "sku": SKU, "price": PRICE}
    if kind == "equip":
        driver.equipped = not driver.equipped
        if driver.equipped:
            body = {"type": "equip", "profile": PROFILE, "slot": FRAME_SLOT, "sku": FRAME_SKU}
            return conn, "equip", body
        return conn, "unequip", {"type": "unequip", "profile": PROFILE, "slot": FRAME_SLOT}
    return conn, "state", {"type": "state"}


async def _report(run: _Run, report: Callable[[int], None]) -> None:
    while True:
        await asyncio.sleep(0.25)
        report(run.progress)


def worker_process(plan: WorkerPlan, ready: Any, progress: Any, out: Any) -> None:
    """Entry point of a load-generator process (``multiprocessing``): ``ready``
    an Event, ``progress`` a shared array of reply counts, ``out`` a queue that
    gets ``(index, WorkerResult.to_dict())``.

    The cycle collector is off in this process: a full collection of a heap
    holding every request's record paused the generator for tens of ms,
    and those pauses counted as the server's latency.  A run is short, and
    what it leaves for the collector is little."""
    import gc

    import uvloop

    gc.disable()

    def report(count: int) -> None:
        progress[plan.index] = count

    try:
        result = uvloop.run(run_worker(plan, ready.set, report))
        out.put((plan.index, result.to_dict()))
    except BaseException as exc:
        out.put((plan.index, {"fatal": repr(exc)}))
        raise
