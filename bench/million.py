"""``loadout bench users``: a million registered users (BENCHMARKS.md, "Scale").

* ``load``: write ``--count`` registered users into Loadout's database with
  COPY (``bench.bulkload``), in the database a ``loadout`` command finds
  (``LOADOUT_DATA_DIR`` or ``LOADOUT_DATABASE_URL``); reports rows/s.
* ``drive``: against a running server, a random ``--active`` of the loaded
  users each get a grant, pipelined over one admin connection (``loadout
  bench``'s funding: each activates its user from PostgreSQL and journals a
  change); then ``--players`` of them each play one short session (connect
  as the player, purchase, ``state``, disconnect), ``--sessions`` at a time;
  then ``--cold`` other loaded users are read one at a time with
  ``inspect``, twice each (cold: activated from PostgreSQL; warm: resident),
  as ``python -m bench.cold`` does.  Shards' resident users (``/metrics``,
  refreshed every few seconds) and, with ``--server-pid``, the shard
  processes' resident memory are sampled throughout.
* ``restart``: with ``--server-pid``, SIGKILL the shard actors' processes
  (children of that server) and time until a user of each shard is served
  again (Ray restarts the actor; it takes a new epoch and serves).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import time
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

from bench.bulkload import CHUNK, bulk_load, user_id
from bench.load import PRICE, SKU
from bench.report import summary
from bench.shard_probe import SUBPROTOCOL, Sampler, cmd_restart, emit, timed
from protocol.messages import Role
from server.auth import issue_token
from server.config import Settings

__all__ = ["add_commands", "cold_reads"]

#: Seconds for the gateway's /metrics to catch up with the shards' stats.
METRICS_SETTLE = 12.0


def add_commands(bench: argparse.ArgumentParser) -> None:
    """``loadout bench users load|drive|restart``."""
    subs = bench.add_subparsers(dest="bench_command", metavar="{users}")
    users = subs.add_parser("users", help="a million registered users: load, drive, restart")
    actions = users.add_subparsers(dest="users_command", required=True)
    load = actions.add_parser("load", help="COPY registered users into the database")
    load.add_argument("--count", type=int, required=True, help="users to write")
    load.add_argument("--start", type=int, default=0, help="index of the first (default 0)")
    load.add_argument("--prefix", default="m", help="id prefix (default m)")
    load.add_argument("--balance", type=int, default=1_000_000, help="starting credit")
    load.add_argument("--chunk", type=int, default=CHUNK, help="users per transaction")
    load.set_defaults(run=_cmd_load)
    drive = actions.add_parser("drive", help="sessions of a random set of loaded users")
    _target(drive)
    drive.add_argument("--count", type=int, required=True, help="users loaded")
    drive.add_argument("--prefix", default="m", help="id prefix (default m)")
    drive.add_argument("--active", type=int, default=100_000, help="users granted gems")
    drive.add_argument("--players", type=int, default=5000, help="of them, who play a session")
    drive.add_argument("--skip", type=int, default=0, help="draw after this many (a second set)")
    drive.add_argument("--sessions", type=int, default=64, help="sessions at a time")
    drive.add_argument("--cold", type=int, default=2000, help="users read cold, one at a time")
    drive.add_argument("--seed", type=int, default=1)
    drive.add_argument("--out", help="JSON result file")
    drive.set_defaults(run=_cmd_drive)
    restart = actions.add_parser("restart", help="kill the shard actors, time their return")
    _target(restart)
    restart.add_argument("--probes", type=int, default=8, help="users probed per shard")
    restart.add_argument("--shards", type=int, default=2, help="the server's shard count")
    restart.add_argument("--users-prefix", default="probe", help="probe user id prefix")
    restart.add_argument("--out", help="JSON result file")
    restart.set_defaults(run=cmd_restart)


def _target(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--url", required=True, help="the server's WebSocket URL")
    a("--secret-file", required=True, help="file holding the server's secret")
    a("--metrics", help="the server's /metrics URL (resident users per shard)")
    a("--server-pid", type=int, help="the server's pid: its shard processes are measured")


# ---------------------------------------------------------------------- load


def _cmd_load(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_load(settings, args))


async def _load(settings: Settings, args: argparse.Namespace) -> int:
    from server.cli_database import database

    if args.count < 1 or args.chunk < 1:
        print("loadout bench users load: --count and --chunk must be >= 1")
        return 2
    last = [time.perf_counter()]

    def progress(done: int) -> None:
        if time.perf_counter() - last[0] >= 5 or done == args.count:
            last[0] = time.perf_counter()
            print(f"  {done:,} users", flush=True)

    async with database(settings) as (pool, _), pool.acquire() as con:
        result = await bulk_load(
            con, args.count, prefix=args.prefix, start=args.start, balance=args.balance,
            chunk=args.chunk, progress=progress,
        )  # fmt: skip
    print(
        f"loaded {result.users:,} users ({result.rows:,} rows) in {result.seconds:.1f} s:"
        f" {result.users_per_s:,.0f} users/s, {result.rows_per_s:,.0f} rows/s"
    )
    return 0


# --------------------------------------------------------------------- drive


class Sessions:
    """One short session per user: connect, purchase, state, close."""

    def __init__(self, url: str, secret: str, run_id: str) -> None:
        self.url, self.secret, self.run_id = url, secret, run_id
        self.latencies: dict[str, list[float]] = {"connect": [], "purchase": [], "state": []}
        self.errors: dict[str, int] = {}
        self.done = 0

    async def session(self, user: str) -> None:
        token = issue_token(self.secret, user, Role.PLAYER, 3600)
        try:
            started = time.perf_counter()
            async with connect(
                self.url, additional_headers={"Authorization": f"Bearer {token}"},
                subprotocols=[SUBPROTOCOL], ping_interval=None,  # type: ignore[list-item]
            ) as ws:  # fmt: skip
                await asyncio.wait_for(ws.recv(), 30)  # welcome
                self.latencies["connect"].append((time.perf_counter() - started) * 1000)
                purchase = {"type": "purchase", "rid": 1, "key": f"scale-{self.run_id}",
                            "sku": SKU, "price": PRICE}  # fmt: skip
                state = {"type": "state", "rid": 2}
                for kind, message in (("purchase", purchase), ("state", state)):
                    took, reply = await timed(ws, message)
                    if reply["type"] == "error":
                        self._error(f"{kind}:{reply['code']}")
                    else:
                        self.latencies[kind].append(took)
        except (OSError, TimeoutError, Exception) as exc:  # counted, the run goes on
            self._error(type(exc).__name__)
        self.done += 1

    def _error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


async def _run_sessions(sessions: Sessions, users: list[str], concurrency: int) -> float:
    queue = iter(users)
    started = time.perf_counter()

    async def worker() -> None:
        for user in queue:
            await sessions.session(user)

    async def report() -> None:
        while True:
            await asyncio.sleep(10)
            rate = sessions.done / (time.perf_counter() - started)
            print(f"  {sessions.done:,}/{len(users):,} sessions ({rate:,.0f}/s)", flush=True)

    reporter = asyncio.create_task(report())
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        reporter.cancel()
    return time.perf_counter() - started


async def cold_reads(url: str, secret: str, users: list[str]) -> dict[str, Any]:
    """``inspect`` each user twice, one request at a time: cold, then warm."""
    token = issue_token(secret, "bench-scale", Role.ADMIN, 3600)
    cold: list[float] = []
    warm: list[float] = []
    async with connect(
        url, additional_headers={"Authorization": f"Bearer {token}"},
        subprotocols=[SUBPROTOCOL], ping_interval=None,  # type: ignore[list-item]
    ) as ws:  # fmt: skip
        await ws.recv()  # welcome
        for i, user in enumerate(users):
            for into in (cold, warm):
                took, reply = await timed(ws, {"type": "inspect", "rid": i, "user": user})
                if reply["type"] != "state" or reply["version"] < 1:
                    raise RuntimeError(f"{user} is not a registered user: {reply}")
                into.append(took)
    extra = [c - w for c, w in zip(cold, warm, strict=True)]
    return {
        "cold_ms": summary(cold),
        "warm_ms": summary(warm),
        "cold_minus_warm_ms": summary(extra),
    }


def _cmd_drive(settings: Settings, args: argparse.Namespace) -> int:
    if args.skip + args.active + args.cold > args.count:
        print("loadout bench users drive: need skip + active + cold <= count")
        return 2
    return asyncio.run(_drive(args, Path(args.secret_file).read_text().strip()))


async def _drive(args: argparse.Namespace, secret: str) -> int:
    from bench.main import fund_users  # (bench.main registers these commands)

    rng = random.Random(args.seed)
    # One shuffle of every index, cut in turn: a second run with --skip draws
    # users that the first did not touch.
    drawn = rng.sample(range(args.count), args.skip + args.active + args.cold)
    active = [user_id(args.prefix, i) for i in drawn[args.skip : args.skip + args.active]]
    cold = [user_id(args.prefix, i) for i in drawn[args.skip + args.active :]]
    started = time.perf_counter()
    sampler = Sampler(args, started)
    print(json.dumps(await sampler.sample("before")), flush=True)
    background = asyncio.create_task(sampler.run())
    sessions = Sessions(args.url, secret, secrets.token_hex(3))
    try:
        funding = time.perf_counter()
        failures = await fund_users(args.url, secret, active)
        funded = time.perf_counter() - funding
        await asyncio.sleep(METRICS_SETTLE)
        after_grants = await sampler.sample("after grants")
        players = active[: args.players]
        took = await _run_sessions(sessions, players, args.sessions)
        await asyncio.sleep(METRICS_SETTLE)
        after_sessions = await sampler.sample("after sessions")
        cold_result = await cold_reads(args.url, secret, cold) if cold else {}
        await asyncio.sleep(METRICS_SETTLE)
        after_cold = await sampler.sample("after cold reads")
    finally:
        background.cancel()
    result = {
        "count": args.count, "active": args.active, "skip": args.skip,
        "grants": {"seconds": round(funded, 1), "per_s": _rate(len(active), funded),
                   "failures": failures},
        "players": len(players), "sessions_at_a_time": args.sessions,
        "seconds": round(took, 1), "sessions_per_s": _rate(len(players), took),
        "latency_ms": {k: summary(v) for k, v in sessions.latencies.items()},
        "errors": sessions.errors, "cold_reads": {"users": len(cold), **cold_result},
        "before": sampler.samples[0], "after_grants": after_grants,
        "after_sessions": after_sessions, "after_cold": after_cold, "samples": sampler.samples,
    }  # fmt: skip
    emit(result, args.out)
    return 0 if not sessions.errors and not failures else 1


def _rate(count: int, seconds: float) -> float | None:
    return round(count / seconds, 1) if seconds else None
