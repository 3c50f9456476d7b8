"""One flooding user against everyone else: what it costs the others.

python -m bench.flood [--users 100] [--rate 1000] [--duration 10] [--warmup 3]
                      [--flood-connections 4] [--window 512] [--out FILE]

Starts an actor-core server like ``loadout bench`` does, but with the
default rate limits (100 requests/s per user, bursts of 200: the flood must
meet the limit it is about), funds ``--users`` users, and measures them twice
with the load generator of ``loadout bench`` (bench/load.py) in an open loop
at ``--rate`` requests/s in all, the default mix, well under each user's own
limit:

1. *quiet*: those users alone;
2. *flood*: the same, while one more user, in a process of its own, sends
   ``state`` requests on ``--flood-connections`` connections as fast as the
   server answers them (``--window`` unanswered per connection): nearly all
   are refused ``rate_limited``.

It prints and writes (JSON) the others' latency in both runs and what the
flooder sent and got.  The flooder shares this machine's cores with the
server, as the load generator does: a flood from elsewhere would cost the
server only its own share.  ``--flood-connections 0`` is the control: the
same two runs with no flood, to see what the second run differs by anyway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import secrets
import time
from pathlib import Path
from typing import Any

from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_connect
from picows import WSUpgradeResponse as Response
from rich.console import Console
from rich.table import Table

from bench.load import WorkerPlan, run_worker
from bench.main import fund_users
from bench.report import summary
from bench.server import BenchServer
from protocol.messages import Role
from server.auth import issue_token

__all__ = ["main"]

DEFAULT_LIMITS = {"LOADOUT_RATE_PER_SECOND": "100", "LOADOUT_RATE_BURST": "200"}
SUBPROTOCOL = "loadout.v1.msgpack"
#: A pre-encoded ``{"type": "state"}`` in MessagePack: the flooder's every request.
STATE = b"\x81\xa4type\xa5state"


class _Flood(WSListener):
    """One flooding connection: ``window`` requests unanswered at all times."""

    transport: WSTransport

    def __init__(self, window: int, counts: dict[str, int]) -> None:
        super().__init__()
        self.window = window
        self.counts = counts
        self.sending = True

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def start(self) -> None:
        for _ in range(self.window):
            self._send()

    def _send(self) -> None:
        self.counts["sent"] += 1
        self.transport.send(WSMsgType.BINARY, STATE)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.CLOSE:
            transport.disconnect()
            return
        payload = frame.get_payload_as_bytes()
        if b"welcome" in payload:
            return
        self.counts["replies"] += 1
        self.counts["rate_limited" if b"rate_limited" in payload else "other"] += 1
        if self.sending:
            self._send()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.counts["disconnected"] += 1


async def _flood(url: str, token: str, connections: int, window: int, stop: Any) -> dict[str, Any]:
    counts = {"sent": 0, "replies": 0, "rate_limited": 0, "other": 0, "disconnected": 0}
    floods = []
    headers = {"Authorization": f"Bearer {token}", "Sec-WebSocket-Protocol": SUBPROTOCOL}
    for _ in range(connections):
        flood = _Flood(window, counts)

        def listener(request: WSUpgradeRequest, response: Response, f: _Flood = flood) -> _Flood:
            return f

        await ws_connect(listener, url, extra_headers=headers, max_frame_size=2**20)
        floods.append(flood)
    await asyncio.sleep(0.5)  # the welcomes
    started = time.perf_counter()
    for flood in floods:
        flood.start()
    while not stop.is_set():  # noqa: ASYNC110 - a multiprocessing Event, not an asyncio one
        await asyncio.sleep(0.1)
    seconds = time.perf_counter() - started
    for flood in floods:
        flood.sending = False
    await asyncio.sleep(1.0)
    for flood in floods:
        flood.transport.disconnect()
    return {**counts, "seconds": round(seconds, 2),
            "replies_per_s": round(counts["replies"] / seconds, 1)}  # fmt: skip


def _flood_process(
    url: str, token: str, connections: int, window: int, stop: Any, out: Any
) -> None:
    import uvloop

    out.put(uvloop.run(_flood(url, token, connections, window, stop)))


def _measure(plan: WorkerPlan) -> dict[str, Any]:
    import uvloop

    result = uvloop.run(run_worker(plan))
    every = [v for values in result.latencies.values() for v in values]
    return {
        "all": summary(every),
        "requests": {kind: summary(values) for kind, values in sorted(result.latencies.items())},
        "ok": sum(result.ok.values()),
        "errors": dict(result.errors),
        "unanswered": result.unanswered,
        "setup_errors": result.setup_errors[:10],
    }


def _plan(args: argparse.Namespace, url: str, tokens: dict[str, str], seed: int) -> WorkerPlan:
    return WorkerPlan(
        index=0, url=url, tokens=tokens, cold=list(tokens), hot=[], watched=[], depth=1,
        rate=args.rate, warmup=args.warmup, duration=args.duration, mix=(0.7, 0.2, 0.1),
        hot_share=0.0, run_id=secrets.token_hex(3), seed=seed,
    )  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    console = Console()
    run_id = secrets.token_hex(3)
    users = [f"q{run_id}-{i}" for i in range(args.users)]
    flooder = f"flood{run_id}"
    with BenchServer("actors", DEFAULT_LIMITS) as server:
        console.print(f"server pid {server.pid} at {server.url}")
        failures = asyncio.run(fund_users(server.url, server.secret, [*users, flooder]))
        if failures:
            raise RuntimeError(f"{failures} grants failed")
        tokens = {u: issue_token(server.secret, u, Role.PLAYER, 3600) for u in users}
        with console.status("quiet run ..."):
            quiet = _measure(_plan(args, server.url, tokens, 1))
        ctx = multiprocessing.get_context("spawn")
        stop, out = ctx.Event(), ctx.Queue()
        token = issue_token(server.secret, flooder, Role.PLAYER, 3600)
        process = ctx.Process(
            target=_flood_process,
            args=(server.url, token, args.flood_connections, args.window, stop, out),
        )
        process.start()
        try:
            time.sleep(2.0)  # connected and flooding before the measured users connect
            with console.status("run with a flooding user ..."):
                flooded = _measure(_plan(args, server.url, tokens, 2))
        finally:
            stop.set()
        flood = out.get(timeout=60)
        process.join(30)
    return {
        "command": "python -m bench.flood " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                       for k, v in sorted(vars(args).items())
                                                       if k != "out"),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "limits": {"rate_per_second": 100, "burst": 200},
        "quiet": quiet,
        "flood": flooded,
        "flooder": flood,
    }  # fmt: skip


def _table(result: dict[str, Any]) -> Table:
    table = Table(title="others' latency (ms), quiet vs with one flooding user")
    for column in ("run", "requests", "p50", "p95", "p99", "max", "errors", "unanswered"):
        table.add_column(column)
    for name in ("quiet", "flood"):
        r = result[name]
        a = r["all"]
        table.add_row(name, str(a["count"]), str(a["p50"]), str(a["p95"]), str(a["p99"]),
                      str(a["max"]), str(r["errors"] or "-"), str(r["unanswered"]))  # fmt: skip
    return table


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__)
    a = parser.add_argument
    a("--users", type=int, default=100, help="users measured (default 100)")
    a("--rate", type=float, default=1000.0, help="their requests/s in all (default 1000)")
    a("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    a("--warmup", type=float, default=3.0, help="seconds before measuring (default 3)")
    a("--flood-connections", type=int, default=4,
      help="the flooder's connections (default 4; 0: the control, no flood)")  # fmt: skip
    a("--window", type=int, default=512, help="unanswered requests per flood connection")
    a("--out", help="JSON result file")
    args = parser.parse_args()
    result = run(args)
    console = Console()
    console.print(_table(result))
    f = result["flooder"]
    console.print(
        f"flooder: {f['sent']:,} sent, {f['replies']:,} answered in {f['seconds']} s "
        f"({f['replies_per_s']:,}/s), {f['rate_limited']:,} rate_limited, {f['other']:,} other"
    )
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
