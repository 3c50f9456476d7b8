"""``loadout bench``: start a server (or target one), fund users, drive the
mix, report; with ``--baseline lock``, do it again against the lock baseline
on a fresh server and data directory, and compare.

Users: ``--users`` ids (default 10,000) are all pre-funded with admin grants,
pipelined over one admin connection.  ``--connections`` of them (drawn at
random) each get one connection, which acts for that user only; with
``--hot``, 1% of the users (at least one per load-generator process) are hot
and receive half of the purchases, over one connection each.  The users of
the connections do not change during a run.

The command reaches ``loadout`` through the ``loadout.commands`` entry point
(``register``, declared in pyproject.toml): the benchmark imports the server,
never the other way round.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import queue
import random
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from websockets.asyncio.client import ClientConnection, connect

from bench.load import WorkerPlan, worker_process
from bench.million import add_commands
from bench.report import comparison_table, machine, merge, plot, run_table, write_json
from bench.scale import ServerWatch, scale, scale_table
from bench.server import BenchServer
from protocol.messages import Role
from server.auth import issue_token
from server.config import Settings

__all__ = ["add_arguments", "fund_users", "register", "run"]

GRANT = 10**12  # gems per user: never the limit
FUND_WINDOW = 2000  # grants in flight on the admin connection
SETUP_SECONDS = 300  # for the load generators to connect and set up
PHASE_PRECISION = 0.25  # seconds: how late a phase's samples may be taken


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bench`` to the ``loadout`` command (the ``loadout.commands`` entry point)."""
    bench = commands.add_parser(
        "bench",
        help="benchmark a server (one it starts, or --url); --baseline lock compares",
        description="Drive a Loadout server with WebSocket clients and report throughput "
        "and latency (see BENCHMARKS.md).",
    )
    add_arguments(bench)
    bench.set_defaults(run=_cmd_bench)
    add_commands(bench)  # loadout bench users ...


def _cmd_bench(settings: Settings, args: argparse.Namespace) -> int:
    # The bench reads no server settings: the servers it starts get their own.
    return run(args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--url", help="target a running server instead of starting one")
    a("--secret", help="the target server's token secret (with --url)")
    a("--secret-file", help="file holding the target server's secret (with --url)")
    a("--baseline", choices=["lock"], help="also run the lock baseline and compare")
    a("--connections", type=int, default=200, help="WebSocket connections (default 200)")
    a("--users", type=int, default=10_000, help="users funded, connections drawn from them")
    a("--depth", type=int, default=1, help="closed loop: requests in flight per connection")
    a("--rate", type=float, help="open loop: offered requests/s across all connections")
    a("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    a("--warmup", type=float, default=3.0, help="seconds of load before measuring (default 3)")
    a("--hot", action="store_true", help="1%% of users receive 50%% of purchases")
    a("--mix", default="70,20,10", help="percent purchase,equip/unequip,state (default 70,20,10)")
    a("--procs", type=int, default=1, help="load-generator processes (default 1)")
    a("--push-sample", type=float, default=0.1, help="share of users watched for pushes")
    a("--pace", type=_seconds, metavar="SECONDS",
      help="paced: each connection sends a request every SECONDS on average, "
      "jittered 0.5x-1.5x (a game's pace; e.g. 20s)")  # fmt: skip
    a("--watchers", type=int, default=0,
      help="service connections that watch the driven users (PROTOCOL.md §11), "
      "split over --procs; their push latency is reported")  # fmt: skip
    a("--connect-window", type=int, default=200,
      help="connections each load generator opens at once (default 200)")  # fmt: skip
    a("--server-env", action="append", default=[], metavar="NAME=VALUE",
      help="extra environment for the servers the bench starts (repeatable)")  # fmt: skip
    a("--out", help="JSON result file (default bench-results/<timestamp>.json)")
    a("--no-plot", action="store_true", help="do not draw the PNG plot")
    a("--seed", type=int, default=None, help="random seed (default: random)")


def _seconds(text: str) -> float:
    """``20``, ``20s``, ``500ms`` or ``2m``, in seconds (> 0)."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0}
    number, scale = text.strip(), 1.0
    for suffix in ("ms", "s", "m"):
        if number.endswith(suffix):
            number, scale = number[: -len(suffix)], units[suffix]
            break
    try:
        value = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 20s)") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a duration must be positive: {text!r}")
    return value


def _mix(text: str) -> tuple[float, float, float]:
    parts = [float(x) for x in text.split(",")]
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError("--mix is three non-negative percentages: purchase,equip,state")
    total = sum(parts)
    return parts[0] / total, parts[1] / total, parts[2] / total


def run(args: argparse.Namespace) -> int:
    console = Console()
    try:
        mix = _mix(args.mix)
        extra_env = dict(item.split("=", 1) for item in args.server_env)
    except ValueError as exc:
        console.print(f"[red]loadout bench: {exc}")
        return 2
    if args.connections < 1 or args.users < args.connections or args.procs < 1:
        console.print("[red]loadout bench: need 1 <= connections <= users and procs >= 1")
        return 2
    if args.pace and args.rate:
        console.print("[red]loadout bench: --pace and --rate are two ways to pace; pick one")
        return 2
    if args.watchers < 0 or args.connect_window < 1:
        console.print("[red]loadout bench: need --watchers >= 0 and --connect-window >= 1")
        return 2
    if args.url and args.baseline:
        console.print("[red]loadout bench: --baseline starts its own servers; drop --url")
        return 2
    secret = args.secret
    if args.url and not secret:
        if not args.secret_file:
            console.print("[red]loadout bench: --url needs --secret or --secret-file")
            return 2
        secret = Path(args.secret_file).read_text().strip()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out or f"bench-results/{stamp}.json")
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    targets = [("loadout", "actors")]
    if args.baseline:
        targets.append(("lock", "lock"))
    results: list[dict[str, Any]] = []
    for name, core in targets:
        if args.url:
            results.append(_measure(console, args, name, core, args.url, secret, mix, seed, None))
            continue
        server = BenchServer(core, extra_env)
        console.print(f"[bold]{name}[/]: starting a {core} server ...")
        try:
            server.start()
            console.print(f"  server pid {server.pid} at {server.url}")
            results.append(
                _measure(console, args, name, core, server.url, server.secret, mix, seed, server)
            )
        finally:
            server.stop()
        _print_run(console, results[-1])
    if args.url:
        _print_run(console, results[-1])
    if len(results) == 2:
        console.print(comparison_table(results[0], results[1]))
    document = {
        "started_at": stamp,
        "command": "loadout bench " + " ".join(_argv(args)),
        "machine": machine(),
        "seed": seed,
        "runs": results,
    }
    if len(results) == 2:
        a, b = (r["throughput"]["purchases_per_s"] for r in results)
        document["purchase_throughput_ratio"] = round(a / b, 2) if b else None
    write_json(out, document)
    console.print(f"results: {out}")
    if not args.no_plot and plot(out.with_suffix(".png"), results, console):
        console.print(f"plot: {out.with_suffix('.png')}")
    failed = [r["name"] for r in results if not r["requests"].get("purchase", {}).get("count")]
    if failed:
        console.print(f"[red]no purchase completed in: {', '.join(failed)}")
        return 1
    return 0


def _print_run(console: Console, result: dict[str, Any]) -> None:
    console.print(run_table(result))
    if result.get("scale"):
        console.print(scale_table(result))


def _argv(args: argparse.Namespace) -> list[str]:
    out = []
    for key, value in sorted(vars(args).items()):
        if key in ("run", "command", "secret") or value in (None, False, []):
            continue
        flag = "--" + key.replace("_", "-")
        out.append(flag if value is True else f"{flag} {value}")
    return out


def _measure(
    console: Console, args: argparse.Namespace, name: str, core: str, url: str, secret: str,
    mix: tuple[float, float, float], seed: int, server: BenchServer | None,
) -> dict[str, Any]:  # fmt: skip
    rng = random.Random(seed)
    run_id = secrets.token_hex(3)
    users = [f"b{run_id}-{i}" for i in range(args.users)]
    n_hot = max(args.procs, args.users // 100) if args.hot else 0
    pool = users[:]
    rng.shuffle(pool)
    hot, cold = pool[:n_hot], pool[n_hot : n_hot + args.connections]
    started = time.perf_counter()
    with console.status(f"funding {len(users)} users ..."):
        failures = asyncio.run(fund_users(url, secret, users))
    console.print(
        f"  funded {len(users)} users in {time.perf_counter() - started:.1f} s"
        + (f" ([red]{failures} failed[/])" if failures else "")
    )
    tokens = {u: issue_token(secret, u, Role.PLAYER, 3600 * 4) for u in [*hot, *cold]}
    service = [
        issue_token(secret, f"bench-watcher-{i}", Role.SERVICE, 3600 * 4)
        for i in range(args.watchers)
    ]
    plans = []
    for i in range(args.procs):
        mine = cold[i :: args.procs]
        watched = mine[: max(1, round(len(mine) * args.push_sample))] if mine else []
        watchers = service[i :: args.procs]
        plans.append(
            WorkerPlan(
                index=i, url=url, tokens={u: tokens[u] for u in [*mine, *hot[i :: args.procs]]},
                cold=mine, hot=hot[i :: args.procs], watched=watched, depth=args.depth,
                rate=args.rate * len(mine) / len(cold) if args.rate else None,
                warmup=args.warmup, duration=args.duration, mix=mix,
                hot_share=0.5 if args.hot else 0.0, run_id=run_id, seed=seed + i,
                pace=args.pace, service_tokens=watchers,
                watch_users=[*mine, *hot[i :: args.procs]] if watchers else [],
                connect_window=args.connect_window,
            )
        )  # fmt: skip
    watch = ServerWatch(server.pid, server.http_port) if server and server.pid else None
    if watch is not None:
        watch.phase("before")
    workers = _drive(console, plans, args.warmup + args.duration, watch.phase if watch else None)
    settings = {
        "connections": args.connections, "users": args.users, "depth": args.depth,
        "rate": args.rate, "hot": args.hot, "hot_users": n_hot, "duration": args.duration,
        "warmup": args.warmup, "procs": args.procs, "push_sample": args.push_sample,
        "mix": list(mix), "url": url, "pace": args.pace, "watchers": args.watchers,
        "connect_window": args.connect_window,
    }  # fmt: skip
    result = merge(name, core, workers, settings)
    result["scale"] = scale(workers, watch)
    return result


async def fund_users(url: str, secret: str, users: list[str]) -> int:
    """Grant every user ``GRANT`` gems (idempotent key), pipelined; return failures."""
    token = issue_token(secret, "bench-admin", Role.ADMIN, 3600)
    encode, decode = msgspec.msgpack.encode, msgspec.msgpack.decode
    async with connect(
        url,
        additional_headers={"Authorization": f"Bearer {token}"},
        subprotocols=["loadout.v1.msgpack"],  # type: ignore[list-item]
        max_size=2**20,
        ping_interval=None,
    ) as ws:
        await asyncio.wait_for(_recv(ws), 30)  # welcome
        todo = list(range(len(users)))
        failures = 0
        for _attempt in range(5):
            window = asyncio.Semaphore(FUND_WINDOW)
            retry: list[int] = []
            waiting = len(todo)

            async def send(batch: list[int], window: asyncio.Semaphore = window) -> None:
                for i in batch:
                    await window.acquire()
                    grant = {"type": "grant", "rid": i, "user": users[i], "amount": GRANT,
                             "key": "bench-fund", "reason": "loadout bench"}  # fmt: skip
                    await ws.send(encode(grant))

            sender = asyncio.get_running_loop().create_task(send(todo))
            while waiting:
                reply = decode(await asyncio.wait_for(_recv(ws), 60))
                if reply.get("rid") is None:
                    continue
                waiting -= 1
                window.release()
                if reply["type"] == "error":
                    if reply["code"] in ("rate_limited", "unavailable"):
                        retry.append(reply["rid"])
                    else:
                        failures += 1
            await sender
            if not retry:
                break
            await asyncio.sleep(0.5)
            todo = retry
        else:
            failures += len(retry)
        return failures


async def _recv(ws: ClientConnection) -> bytes:
    frame = await ws.recv()
    return frame if isinstance(frame, bytes) else frame.encode()


def _drive(
    console: Console, plans: list[WorkerPlan], seconds: float,
    phase: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Run one load-generator process per plan with a progress bar; their results.

    The load starts in every process at once, when all are set up (or the
    set-up time is over).  ``phase`` is called with ``open`` then (every
    connection open, before the load), ``from`` at the end of the warm-up
    and ``to`` at the end of the measured window."""
    ctx = multiprocessing.get_context("spawn")
    progress_counts = ctx.Array("q", len(plans), lock=False)
    results: Any = ctx.Queue()
    readies = [ctx.Event() for _ in plans]
    go = ctx.Event()
    processes = [
        ctx.Process(target=worker_process, args=(plan, ready, progress_counts, results, go))
        for plan, ready in zip(plans, readies, strict=True)
    ]
    for p in processes:
        p.start()
    out: dict[int, dict[str, Any]] = {}
    try:
        with console.status("connecting and setting up ..."):
            deadline = time.monotonic() + SETUP_SECONDS
            while not all(r.is_set() for r in readies) and time.monotonic() < deadline:
                if not all(p.is_alive() for p in processes):
                    break
                time.sleep(0.1)
        phases = [(0.0, "open"), (plans[0].warmup, "from"), (seconds, "to")]
        start = time.monotonic()
        _next_phase(phases, 0.0, phase)
        go.set()
        _follow(console, processes, progress_counts, results, out, plans[0].warmup, seconds,
                lambda elapsed: _next_phase(phases, elapsed, phase))  # fmt: skip
        _next_phase(phases, time.monotonic() - start, phase)
    finally:
        go.set()
        for p in processes:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
    missing = [i for i in range(len(plans)) if i not in out]
    for i in missing:
        out[i] = {"fatal": f"load generator {i} exited with {processes[i].exitcode}"}
    return [out[i] for i in range(len(plans))]


def _next_phase(
    phases: list[tuple[float, str]], elapsed: float, phase: Callable[[str], None] | None
) -> None:
    """Call ``phase`` for each phase due after ``elapsed`` seconds of load, once."""
    while phases and phases[0][0] <= elapsed:
        _, name = phases.pop(0)
        if phase is not None:
            phase(name)


def _follow(
    console: Console, processes: list[Any], progress_counts: Any, results: Any,
    out: dict[int, dict[str, Any]], warmup: float, seconds: float,
    tick: Callable[[float], None],
) -> None:  # fmt: skip
    """Show the load's progress until every worker has sent its results."""
    columns = (
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )  # fmt: skip
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("load", total=seconds, rate="")
        start = time.monotonic()
        last_count, last_time = 0, start
        while len(out) < len(processes):
            tick(time.monotonic() - start)
            try:
                index, result = results.get(timeout=min(0.5, PHASE_PRECISION))
                out[index] = result
                continue
            except queue.Empty:
                pass
            now = time.monotonic()
            count = sum(progress_counts)
            rate = (count - last_count) / max(1e-3, now - last_time)
            last_count, last_time = count, now
            phase = "warm-up" if now - start < warmup else "measuring"
            bar.update(
                task, completed=min(seconds, now - start), description=phase,
                rate=f"{rate:,.0f} replies/s",
            )  # fmt: skip
            if now - start > seconds + 240:
                raise TimeoutError("the load generators did not finish")
            if not any(p.is_alive() for p in processes) and results.empty():
                break
