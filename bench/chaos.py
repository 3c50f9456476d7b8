"""Chaos: retrying clients keep buying and using items while the server's
parts are killed under them, then every acknowledged change must be there
exactly once and every refused one absent (issue "resilience").

``python -m bench.chaos --minutes N`` runs the faults in rounds for N
minutes against a fully embedded ``loadout serve`` of its own (its own
PostgreSQL, Redis and Ray in a temporary data directory) and prints the
figures: changes acknowledged, lost, doubled, and each fault's recovery
time (from the fault until every client has had a change acknowledged).
``tests/chaos`` runs one short round of the same scenario in CI.

The faults, in each round: ``kill -9`` of a shard actor's process (Ray starts
it again), of the embedded Redis, of the embedded PostgreSQL (``loadout
serve`` starts them again), of the whole server (started again by this
script), and a SIGTERM (the graceful drain; started again).

Every client sends keyed requests (``purchase`` of a 5-gem booster, and
``consume`` of one it holds) and retries each, identical and under its key,
through ``unavailable``, closed connections and a server that is not up,
until the reply is final.  The check afterwards reads each user's ``state``
and ``history`` through a fresh server, and ``loadout verify`` checks the
whole database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import psutil
from websockets.asyncio.client import ClientConnection, connect

from protocol.messages import Role
from server.auth import issue_token

__all__ = ["ChaosReport", "ChaosServer", "run_chaos"]

BOOSTER = "plat.booster.xp"
PRICE = 5
FUNDS = 1_000_000
#: A request not answered in this long is sent again (same key).
REPLY_SECONDS = 30.0
#: A fault after which some client is not served again in this long fails the run.
RECOVERY_LIMIT = 120.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ChaosServer:
    """A fully embedded ``loadout serve`` on a data directory, started again
    on the same directory after each crash or stop."""

    def __init__(self, data_dir: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.extra_env = env or {}
        self.data_dir = data_dir
        self.log = log
        self.port = _free_port()
        self.http_port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LOADOUT_", "RAY_"))}
        env.update(
            LOADOUT_DATA_DIR=str(self.data_dir),
            LOADOUT_PORT=str(self.port),
            LOADOUT_HTTP_PORT=str(self.http_port),
            LOADOUT_LOG_LEVEL="WARNING",
            RAY_USAGE_STATS_ENABLED="0",
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 120.0) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "serve"], env=self.env(),
                stdout=out, stderr=subprocess.STDOUT, cwd=self.data_dir.parent,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited {self.process.returncode}: see {self.log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        self.kill()  # never leave it behind
        raise RuntimeError(f"the server did not come up in {timeout} s: see {self.log}")

    def secret(self) -> str:
        return (self.data_dir / "secret").read_text().strip()

    def children(self, word: str, *, direct: bool = False) -> list[psutil.Process]:
        """Live processes of the server's tree (``direct``: its own children)
        whose command starts with ``word``."""
        assert self.process is not None
        found = []
        for p in psutil.Process(self.process.pid).children(recursive=not direct):
            try:
                cmd = p.cmdline()
                if cmd and (word in Path(cmd[0]).name or cmd[0].startswith(word)):
                    if p.status() != psutil.STATUS_ZOMBIE:
                        found.append(p)
            except psutil.Error:
                continue
        return found

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self, timeout: float = 90.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9


@dataclass
class UserLog:
    """What one client was told: the final reply to every key it used."""

    user: str
    acked: dict[str, dict[str, Any]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    held: int = 0


@dataclass
class ChaosReport:
    acknowledged: int = 0
    refused: int = 0
    lost: int = 0
    doubled: int = 0
    unexplained: list[str] = field(default_factory=list)
    #: Per fault, seconds from the fault until every client had a change acknowledged.
    recovery: dict[str, list[float]] = field(default_factory=dict)
    verify_exit: int | None = None
    verify_report: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return (
            not self.lost and not self.doubled and not self.unexplained
            and self.verify_exit in (0, None)
        )  # fmt: skip


class _Client:
    """One user's retrying client."""

    def __init__(
        self,
        server: ChaosServer,
        log: UserLog,
        seen: Callable[[float], None] = lambda sent: None,
        role: Role = Role.PLAYER,
    ) -> None:
        self._server = server
        self._user = log.user
        self._role = role
        self._log = log
        self._seen = seen
        self._ws: ClientConnection | None = None
        self._rid = 0

    async def _connection(self) -> ClientConnection:
        while self._ws is None:
            try:
                token = issue_token(self._server.secret(), self._user, self._role, 86_400)
                ws = await asyncio.wait_for(
                    connect(
                        self._server.url, additional_headers={"Authorization": f"Bearer {token}"}
                    ),
                    5,
                )
                welcome = json.loads(await asyncio.wait_for(ws.recv(), 5))
                if welcome.get("type") == "welcome":
                    self._ws = ws
                else:
                    await ws.close()
            except Exception:
                await asyncio.sleep(0.3)
        return self._ws

    async def settle(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send ``request`` until its reply is final (same key every time)."""
        delay = 0.1
        while True:
            try:
                ws = await self._connection()
                self._rid += 1
                rid = self._rid
                await ws.send(json.dumps({**request, "rid": rid}))
                deadline = time.monotonic() + REPLY_SECONDS
                while True:
                    message = json.loads(
                        await asyncio.wait_for(ws.recv(), deadline - time.monotonic())
                    )
                    if message.get("rid") == rid:
                        break
            except Exception:
                if self._ws is not None:
                    with contextlib.suppress(Exception):
                        await self._ws.close()
                self._ws = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if message.get("code") in ("unavailable", "rate_limited"):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            return dict(message)

    async def run(self, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            key = f"c{n}"
            if self._log.held > 0 and random.random() < 0.3:
                request = {"type": "consume", "key": key, "sku": BOOSTER, "quantity": 1}
            else:
                request = {"type": "purchase", "key": key, "sku": BOOSTER, "price": PRICE}
            sent = time.monotonic()
            reply = await self.settle(request)
            if reply["type"] == "error":
                self._log.refused[key] = reply["code"]
                continue
            self._log.acked[key] = {**request, "reply": reply}
            self._log.held += 1 if request["type"] == "purchase" else -1
            self._seen(sent)

    async def close(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()


async def _admin(server: ChaosServer, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Admin requests over one connection, each settled under its key."""
    client = _Client(server, UserLog("chaos-ops"), role=Role.ADMIN)
    try:
        return [await client.settle(r) for r in requests]
    finally:
        await client.close()


Fault = tuple[str, Callable[[ChaosServer], Awaitable[None]]]


async def _kill_first(server: ChaosServer, word: str, *, direct: bool = False) -> None:
    victims = server.children(word, direct=direct)
    if not victims:
        raise RuntimeError(f"no {word} process to kill")
    victims[0].kill()


async def _crash(server: ChaosServer) -> None:
    await asyncio.to_thread(server.kill)
    await asyncio.to_thread(server.start)


async def _sigterm(server: ChaosServer) -> None:
    await asyncio.to_thread(server.stop)
    await asyncio.to_thread(server.start)


async def cluster_command(server: ChaosServer, *words: str) -> str:
    """Run ``loadout cluster ...`` against the server, as an operator does;
    its output (raises if it fails)."""
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "server.cli", "cluster", *words],
        env=server.env(), capture_output=True, text=True, timeout=180,
        cwd=server.data_dir.parent,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"cluster {' '.join(words)}: {done.returncode} {done.stderr[-3000:]}")
    return done.stdout


def scaling(counts: Sequence[int], seen: list[str] | None = None) -> list[Fault]:
    """Live moves instead of faults: ``loadout cluster scale N`` for each N
    (each command's output is added to ``seen``)."""

    def scale(count: int) -> Callable[[ChaosServer], Awaitable[None]]:
        async def run(server: ChaosServer) -> None:
            out = await cluster_command(server, "scale", str(count))
            if seen is not None:
                seen.append(out)

        return run

    return [(f"scale {n}", scale(n)) for n in counts]


FAULTS: list[Fault] = [
    ("shard", lambda s: _kill_first(s, "ray::ShardActor")),
    ("redis", lambda s: _kill_first(s, "redis-server", direct=True)),
    ("postgresql", lambda s: _kill_first(s, "postgres", direct=True)),  # the postmaster
    ("server kill -9", _crash),
    ("server SIGTERM", _sigterm),
]


async def run_chaos(
    data_dir: Path,
    *,
    users: int = 12,
    rounds: int = 1,
    spacing: float = 12.0,
    log: Callable[[str], None] = print,
    faults: Sequence[Fault] | None = None,
    env: dict[str, str] | None = None,
) -> ChaosReport:
    """Run the faults (by default ``FAULTS``) ``rounds`` times, ``spacing``
    seconds apart, under load."""
    server = ChaosServer(data_dir, data_dir.parent / "chaos-server.log", env)
    await asyncio.to_thread(server.start)
    report = ChaosReport()
    logs = [UserLog(f"chaos-{i}-{os.getpid()}") for i in range(users)]
    try:
        funded = await _admin(
            server,
            [{"type": "grant", "user": u.user, "amount": FUNDS, "key": "fund"} for u in logs],
        )
        assert all(r["type"] == "granted" for r in funded), funded
        # Per client, when each change it had acknowledged was first sent
        # (recovery: every client served again on a request sent after a fault).
        acks: list[deque[tuple[float, float]]] = [deque(maxlen=10_000) for _ in logs]
        acked = asyncio.Event()

        def seen_by(i: int) -> Callable[[float], None]:
            def seen(sent: float) -> None:
                acks[i].append((sent, time.monotonic()))
                acked.set()

            return seen

        stop = asyncio.Event()
        clients = [_Client(server, u, seen_by(i)) for i, u in enumerate(logs)]
        tasks = [asyncio.create_task(c.run(stop)) for c in clients]
        await asyncio.sleep(spacing)
        for round_ in range(rounds):
            for name, fault in FAULTS if faults is None else faults:
                log(f"round {round_ + 1}: {name}")
                began = time.monotonic()
                await fault(server)  # a kill; or a stop, or a crash, and a new start
                done = time.monotonic()
                while any(not times or times[-1][0] <= done for times in acks):
                    acked.clear()
                    try:
                        await asyncio.wait_for(acked.wait(), RECOVERY_LIMIT)
                    except TimeoutError:
                        why = f"no recovery from {name} in {RECOVERY_LIMIT} s"
                        raise RuntimeError(why) from None
                back = max(min(at for sent, at in times if sent > done) for times in acks)
                report.recovery.setdefault(name, []).append(round(back - began, 2))
                await asyncio.sleep(spacing)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        for c in clients:
            await c.close()
        await _check(server, logs, report)
    finally:
        code = await asyncio.to_thread(server.stop)
        log(f"server stopped ({code})")
    report.verify_exit, report.verify_report = await asyncio.to_thread(_verify, server)
    return report


async def _check(server: ChaosServer, logs: list[UserLog], report: ChaosReport) -> None:
    """Each user's state and ledger against what its client was told."""
    for entry in logs:
        report.acknowledged += len(entry.acked)
        report.refused += len(entry.refused)
        token = issue_token(server.secret(), entry.user, Role.PLAYER, 3600)
        async with connect(
            server.url, additional_headers={"Authorization": f"Bearer {token}"}
        ) as ws:
            await ws.recv()
            state = await _ask(ws, {"type": "state"})
            ledger: list[dict[str, Any]] = []
            before = None
            while True:
                page = await _ask(ws, {"type": "history", "limit": 200, "before": before})
                ledger += page["entries"]
                if page["next"] is None:
                    break
                before = page["next"]
        keys: dict[str, int] = {}
        for e in ledger:
            if e["key"]:
                keys[e["key"]] = keys.get(e["key"], 0) + 1
        purchases = [k for k, a in entry.acked.items() if a["type"] == "purchase"]
        consumes = [k for k, a in entry.acked.items() if a["type"] == "consume"]
        report.lost += sum(1 for k in purchases if keys.get(k, 0) == 0)
        report.doubled += sum(1 for k in purchases if keys.get(k, 0) > 1)
        stray = [k for k in keys if k not in entry.acked and k != "fund"]
        refused_present = [k for k in stray if k in entry.refused]
        if refused_present:
            report.unexplained.append(
                f"{entry.user}: refused keys in the ledger {refused_present[:5]}"
            )
        expected = FUNDS - PRICE * len(purchases)
        if state["balance"] != expected:
            report.unexplained.append(
                f"{entry.user}: balance {state['balance']}, expected {expected}"
            )
        held = sum(i["quantity"] for i in state["inventory"] if i["sku"] == BOOSTER)
        if held != len(purchases) - len(consumes):
            report.unexplained.append(
                f"{entry.user}: holds {held}, told {len(purchases)} bought, {len(consumes)} used"
            )
        if stray and not refused_present:
            report.unexplained.append(f"{entry.user}: keys no client saw acknowledged {stray[:5]}")


async def _ask(ws: ClientConnection, request: dict[str, Any]) -> dict[str, Any]:
    """One read for the check, retried while rate limited (a long ledger is
    many pages) or unavailable."""
    while True:
        await ws.send(json.dumps({**request, "rid": "check"}))
        while True:
            message: dict[str, Any] = json.loads(await ws.recv())
            if message.get("rid") == "check":
                break
        if message.get("code") not in ("rate_limited", "unavailable"):
            return message
        await asyncio.sleep((message.get("retry_after_ms") or 200) / 1000)


def _verify(server: ChaosServer) -> tuple[int | None, dict[str, Any] | None]:
    """``loadout verify --json`` on the data directory, if the command exists."""
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "verify", "--json"], env=server.env(),
        capture_output=True, text=True, timeout=600, cwd=server.data_dir.parent,
    )  # fmt: skip
    if "invalid choice" in done.stderr:
        return None, None
    try:
        parsed: dict[str, Any] = msgspec.json.decode(done.stdout)
    except msgspec.DecodeError:
        parsed = {"stdout": done.stdout[-2000:], "stderr": done.stderr[-2000:]}
    return done.returncode, parsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long (default 10)")
    parser.add_argument("--users", type=int, default=12, help="retrying clients (default 12)")
    parser.add_argument("--spacing", type=float, default=12.0, help="seconds between faults")
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    parser.add_argument(
        "--scale",
        metavar="N,N,...",
        help="instead of faults, scale live to each shard count in turn (e.g. 4,3,2)",
    )
    args = parser.parse_args(argv)
    faults = scaling([int(n) for n in args.scale.split(",")]) if args.scale else FAULTS
    rounds = max(1, int(args.minutes * 60 / (args.spacing * (len(faults) + 1))))
    data_dir = Path(tempfile.mkdtemp(prefix="loadout-chaos-")) / "data"
    data_dir.mkdir()
    started = time.monotonic()
    report = asyncio.run(
        run_chaos(data_dir, users=args.users, rounds=rounds, spacing=args.spacing, faults=faults)
    )
    took = time.monotonic() - started
    figures = {
        "minutes": round(took / 60, 1), "rounds": rounds, "acknowledged": report.acknowledged,
        "refused": report.refused, "lost": report.lost, "doubled": report.doubled,
        "unexplained": report.unexplained, "verify_exit": report.verify_exit,
        "recovery_seconds": {k: {"max": max(v), "all": v} for k, v in report.recovery.items()},
        "data_dir": str(data_dir) if args.keep else None,
    }  # fmt: skip
    print(json.dumps(figures, indent=2))
    if not args.keep:
        import shutil

        shutil.rmtree(data_dir.parent, ignore_errors=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
