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
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.watch import open_watchers
from bench.wire import (
    DRAIN_SECONDS,
    FRAME_PRICE,
    FRAME_SKU,
    FRAME_SLOT,
    KINDS,
    PRICE,
    PROFILE,
    SKU,
    Conn,
    Run,
    SetupRequest,
    Slot,
    WorkerPlan,
    WorkerResult,
    close_all,
    open_many,
)

#: Open files a load generator needs besides its sockets.
FD_SPARE = 256
#: How long a ready worker waits for the others before the load.
GO_TIMEOUT = 600.0

__all__ = [
    "KINDS",
    "PRICE",
    "SKU",
    "WorkerPlan",
    "WorkerResult",
    "raise_own_fd_limit",
    "run_worker",
    "worker_process",
]


async def _setup_frame(conn: Conn, run: Run) -> None:
    """Each cold user buys the frame once (idempotent key) so it can equip it."""
    setup = SetupRequest()
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
    go: Callable[[], Awaitable[None]] | None = None,
) -> WorkerResult:
    """Connect, set up, drive the load for warm-up + duration, and measure.

    ``ready`` is called once set up is done; the load starts right after, or
    once ``go`` returns (so that every worker starts at once); ``report``
    gets the number of replies so far, four times a second."""
    result = WorkerResult()
    run = Run(plan, result)
    conns: dict[str, Conn] = {}
    service: dict[str, Conn] = {}
    ticker: asyncio.Task[None] | None = None
    if report is not None:
        ticker = asyncio.get_running_loop().create_task(_report(run, report))
    try:
        conns = await _connect(plan, run)
        service = await open_watchers(plan, run)
        await asyncio.gather(*(_setup_frame(conns[u], run) for u in plan.cold if u in conns))
        if ready is not None:
            ready()
        if go is not None:
            await go()
        await _load(plan, run, conns)
    finally:
        if ticker is not None:
            ticker.cancel()
        await close_all([*conns.values(), *run.watchers.values(), *service.values()])
    return result


async def _connect(plan: WorkerPlan, run: Run) -> dict[str, Conn]:
    """The users' connections, then the push-sample ones (``run.watchers``)."""
    result = run.result
    started = time.perf_counter()
    users = [*plan.cold, *plan.hot]
    tokens = [(u, plan.tokens[u]) for u in users]
    conns, failures = await open_many(plan.url, tokens, run, plan.connect_window)
    samples = [(u, plan.tokens[u]) for u in plan.watched]
    run.watchers, sample_failures = await open_many(plan.url, samples, run, plan.connect_window)
    result.connect_seconds = time.perf_counter() - started
    result.connected += len(conns) + len(run.watchers)
    result.connect_failures += len(failures) + len(sample_failures)
    result.setup_errors += failures + [f"push sample {f}" for f in sample_failures]
    return conns


async def _load(plan: WorkerPlan, run: Run, conns: dict[str, Conn]) -> None:
    """Drive the load over ``conns``, wait for the last replies, and count
    what never came."""
    result = run.result
    rng = random.Random(plan.seed)
    cold = [conns[u] for u in plan.cold if u in conns]
    hot = [conns[u] for u in plan.hot if u in conns]
    cpu = time.process_time()
    run.start = time.perf_counter()
    run.measure_from = run.start + plan.warmup
    run.measure_to = run.measure_from + plan.duration
    choose = _chooser(plan, rng)
    drivers: list[_Driver]
    if plan.pace:
        drivers = [_Paced(c, hot, run, choose, rng, plan.pace) for c in cold]
    elif plan.rate:
        per_conn = plan.rate / max(1, len(cold))
        drivers = [_OpenLoop(c, hot, run, choose, rng, per_conn) for c in cold]
    else:
        drivers = [_ClosedLoop(c, hot, run, choose, rng) for c in cold]
    await run.drive(drivers)
    result.cpu_seconds = time.process_time() - cpu
    result.wall_seconds = time.perf_counter() - run.start
    result.rss_bytes = _rss()
    result.measured_seconds = plan.duration
    deadline = time.perf_counter() + DRAIN_SECONDS
    while time.perf_counter() < deadline and any(c.pending for c in conns.values()):  # noqa: ASYNC110 - polls many dicts
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # the last pushes
    waiting = [record for c in conns.values() for record in c.pending.values()]
    result.unanswered = sum(1 for _, s, _, _ in [*waiting, *run.lost] if run.measured(s))
    result.missing_pushes = sum(1 for _, v in run.purchases_seen.items() if run.measured(v))
    result.missing_watch_pushes = len(run.changes_seen)  # (measured changes only)


def _rss() -> int:
    import psutil

    rss: int = psutil.Process().memory_info().rss
    return rss


class _Driver(Slot):
    """A cold connection's driver: it sends the mix for its user until the end
    of the window, and frees a slot when a reply comes (or is lost)."""

    def __init__(
        self, conn: Conn, hot: list[Conn], run: Run, choose: Callable[[], str],
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
        self, conn: Conn, hot: list[Conn], run: Run, choose: Callable[[], str],
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
        self, conn: Conn, hot: list[Conn], run: Run, choose: Callable[[], str],
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
            self.due += self._interval()
        self._finish()

    def _interval(self) -> float:
        return self.interval


class _Paced(_OpenLoop):
    """A game's pace: a request every ``pace`` seconds on average, each
    interval drawn uniformly from 0.5x to 1.5x of it (a 20 s pace sends every
    10 to 30 s), the first at a random point of the first interval."""

    def __init__(
        self, conn: Conn, hot: list[Conn], run: Run, choose: Callable[[], str],
        rng: random.Random, pace: float,
    ) -> None:  # fmt: skip
        super().__init__(conn, hot, run, choose, rng, 1.0 / pace)
        self.due = run.start + rng.random() * pace

    def _interval(self) -> float:
        return self.interval * (0.5 + self.rng.random())


def _request(
    conn: Conn, hot: list[Conn], run: Run, choose: Callable[[], str], driver: _Driver,
    rng: random.Random,
) -> tuple[Conn, str, dict[str, Any]]:  # fmt: skip
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


async def _report(run: Run, report: Callable[[int], None]) -> None:
    while True:
        await asyncio.sleep(0.25)
        report(run.progress)


def raise_own_fd_limit(plan: WorkerPlan) -> int:
    """Raise this process's open-file limit for the plan's sockets (as far as
    the hard limit allows: a shortfall shows as failed connections); the
    open files it needs."""
    from server.admission import raise_fd_limit

    sockets = len(plan.cold) + len(plan.hot) + len(plan.watched) + len(plan.service_tokens)
    raise_fd_limit(sockets + FD_SPARE)
    return sockets + FD_SPARE


def worker_process(plan: WorkerPlan, ready: Any, progress: Any, out: Any, go: Any = None) -> None:
    """Entry point of a load-generator process (``multiprocessing``): ``ready``
    an Event, ``progress`` a shared array of reply counts, ``out`` a queue that
    gets ``(index, WorkerResult.to_dict())``, ``go`` an Event the load waits
    for once ready (None: it starts at once).

    The process raises its own open-file limit to what its sockets need (as
    far as the hard limit allows: a shortfall shows as failed connections).

    The cycle collector is off in this process: a full collection of a heap
    holding every request's record paused the generator for tens of ms,
    and those pauses counted as the server's latency.  A run is short, and
    what it leaves for the collector is little."""
    import gc

    import uvloop

    gc.disable()
    raise_own_fd_limit(plan)

    def report(count: int) -> None:
        progress[plan.index] = count

    async def wait_for_go() -> None:
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, go.wait, GO_TIMEOUT):
            raise TimeoutError("the bench did not start the load")

    try:
        result = uvloop.run(run_worker(plan, ready.set, report, wait_for_go if go else None))
        out.put((plan.index, result.to_dict()))
    except BaseException as exc:
        out.put((plan.index, {"fatal": repr(exc)}))
        raise
