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

Only requests scheduled inside the measurement window count.
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
from websockets.asyncio.client import ClientConnection, connect

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


class _Driver:
    """A cold connection's request slots (closed loop) and schedule (open loop)."""

    def __init__(self) -> None:
        self.freed = 0
        self.wake = asyncio.Event()
        self.equipped = False


class _Conn:
    """One WebSocket: sends requests, matches replies by rid, notices pushes."""

    def __init__(self, user: str, ws: ClientConnection, run: _Run) -> None:
        self.user = user
        self.ws = ws
        self.run = run
        self.pending: dict[int, tuple[str, float, float, _Driver | None]] = {}
        self.reader: asyncio.Task[None] | None = None

    async def send(
        self, kind: str, body: dict[str, Any], scheduled: float, driver: _Driver | None
    ) -> None:
        rid = self.run.next_rid()
        body["rid"] = rid
        self.pending[rid] = (kind, scheduled, time.perf_counter(), driver)
        await self.ws.send(_encode(body))

    async def read(self) -> None:
        run = self.run
        with contextlib.suppress(Exception):
            async for frame in self.ws:
                now = time.perf_counter()
                message = _decode(frame)  # type: ignore[arg-type]
                if message.rid is None:
                    if message.type == "inventory" and message.version is not None:
                        run.push_arrived(self.user, message.version, now)
                    continue
                record = self.pending.pop(message.rid, None)
                if record is None:
                    continue
                run.reply_arrived(self.user, record, message, now)


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

    def next_rid(self) -> int:
        self._rid += 1
        return self._rid

    def measured(self, scheduled: float) -> bool:
        return self.measure_from <= scheduled < self.measure_to

    def reply_arrived(
        self,
        user: str,
        record: tuple[str, float, float, _Driver | None],
        message: _Message,
        now: float,
    ) -> None:
        kind, scheduled, sent, driver = record
        if driver is not None:
            driver.freed += 1
            driver.wake.set()
        if kind == "setup":
            return
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


async def _open(url: str, user: str, token: str, run: _Run) -> _Conn:
    ws = await connect(
        url,
        additional_headers={"Authorization": f"Bearer {token}"},
        subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
        compression=None,
        max_size=2**20,
        open_timeout=30,
        ping_interval=None,
    )
    welcome = _decode(await asyncio.wait_for(ws.recv(), 30))  # type: ignore[arg-type]
    if welcome.type != "welcome":
        raise RuntimeError(f"expected a welcome for {user}, got {welcome.type}")
    conn = _Conn(user, ws, run)
    conn.reader = asyncio.get_running_loop().create_task(conn.read())
    return conn


async def _setup_frame(conn: _Conn, run: _Run) -> None:
    """Each cold user buys the frame once (idempotent key) so it can equip it."""
    driver = _Driver()
    body = {"type": "purchase", "key": "bench-frame", "sku": FRAME_SKU, "price": FRAME_PRICE}
    await conn.send("setup", body, time.perf_counter(), driver)
    await asyncio.wait_for(driver.wake.wait(), 60)


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
        if plan.rate:
            per_conn = plan.rate / max(1, len(cold))
            drivers = [_open_loop(c, hot, run, choose, rng, per_conn) for c in cold]
        else:
            drivers = [_closed_loop(c, hot, run, choose, rng) for c in cold]
        await asyncio.gather(*drivers)
        result.measured_seconds = plan.duration
        deadline = time.perf_counter() + DRAIN_SECONDS
        while time.perf_counter() < deadline and any(c.pending for c in conns.values()):  # noqa: ASYNC110 - polls many dicts
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # the last pushes
        result.unanswered = sum(
            1
            for c in conns.values()
            for kind, scheduled, _, _ in c.pending.values()
            if run.measured(scheduled)
        )
        result.missing_pushes = sum(1 for _, v in run.purchases_seen.items() if run.measured(v))
    finally:
        if ticker is not None:
            ticker.cancel()
        for conn in [*conns.values(), *run.watchers.values()]:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.ws.close(), 5)
            if conn.reader is not None:
                conn.reader.cancel()
    return result


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


async def _closed_loop(
    conn: _Conn, hot: list[_Conn], run: _Run, choose: Callable[[], str], rng: random.Random
) -> None:
    driver = _Driver()
    driver.freed = run.plan.depth
    while True:
        free, driver.freed = driver.freed, 0
        driver.wake.clear()
        for _ in range(free):
            now = time.perf_counter()
            if now >= run.measure_to:
                return
            target, kind, body = _request(conn, hot, run, choose, driver, rng)
            run.result.sent += 1
            await target.send(kind, body, now, driver)
        await driver.wake.wait()


async def _open_loop(
    conn: _Conn, hot: list[_Conn], run: _Run, choose: Callable[[], str], rng: random.Random,
    rate: float,
) -> None:  # fmt: skip
    driver = _Driver()
    interval = 1.0 / rate
    due = run.start + rng.random() * interval
    while due < run.measure_to:
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
        elif now - due > 0.001:
            run.result.late_sends += 1
        target, kind, body = _request(conn, hot, run, choose, driver, rng)
        run.result.sent += 1
        await target.send(kind, body, due, driver)
        due += interval


async def _report(run: _Run, report: Callable[[int], None]) -> None:
    while True:
        await asyncio.sleep(0.25)
        report(run.progress)


def worker_process(plan: WorkerPlan, ready: Any, progress: Any, out: Any) -> None:
    """Entry point of a load-generator process (``multiprocessing``): ``ready``
    an Event, ``progress`` a shared array of reply counts, ``out`` a queue that
    gets ``(index, WorkerResult.to_dict())``."""
    import uvloop

    def report(count: int) -> None:
        progress[plan.index] = count

    try:
        result = uvloop.run(run_worker(plan, ready.set, report))
        out.put((plan.index, result.to_dict()))
    except BaseException as exc:
        out.put((plan.index, {"fatal": repr(exc)}))
        raise
