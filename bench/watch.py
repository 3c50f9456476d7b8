"""Service watchers for the load generator (``loadout bench --watchers``):
connections with a ``service`` token that ``watch`` users (PROTOCOL.md §11)
whose changes the same worker drives, so that each change's push to the
watcher can be matched, by user and version, with the change's request
(``bench.wire.Run.watch_push_arrived``)."""

from __future__ import annotations

import asyncio
import time

from bench.wire import Conn, Run, SetupRequest, WorkerPlan, open_many

__all__ = ["WATCH_BATCH", "open_watchers"]

#: Users per ``watch`` request (PROTOCOL.md §11 allows 1-500).
WATCH_BATCH = 500
#: How long a ``watch`` may take to be answered (its snapshots).
WATCH_TIMEOUT = 60.0


async def open_watchers(plan: WorkerPlan, run: Run) -> dict[str, Conn]:
    """Open the worker's service connections and have them watch
    ``plan.watch_users`` (split evenly among them, with inventory pushes);
    failures go to the run's set-up errors, and a watcher whose watch failed
    is closed and left out."""
    if not plan.service_tokens or not plan.watch_users:
        return {}
    tokens = [(f"watcher-{plan.index}.{i}", token) for i, token in enumerate(plan.service_tokens)]
    conns, failures = await open_many(plan.url, tokens, run, plan.connect_window)
    run.result.setup_errors.extend(failures)
    run.result.connect_failures += len(failures)
    run.result.connected += len(conns)
    names = [name for name, _ in tokens if name in conns]
    shares = {name: plan.watch_users[i :: len(names)] for i, name in enumerate(names)}
    outcomes = await asyncio.gather(*(_watch(conns[n], shares[n]) for n in names))
    for name, error in zip(names, outcomes, strict=True):
        if error is not None:
            run.result.setup_errors.append(f"watch by {name}: {error}")
            conns.pop(name).close()
    return conns


async def _watch(conn: Conn, users: list[str]) -> str | None:
    """Send the ``watch`` requests of ``users``, 500 at a time, all at once;
    None once every one is answered ``watching``, else what went wrong."""
    requests = []
    for start in range(0, len(users), WATCH_BATCH):
        setup = SetupRequest()
        body = {"type": "watch", "users": users[start : start + WATCH_BATCH], "inventory": True}
        conn.send("setup", body, time.perf_counter(), setup)
        requests.append(setup)
    try:
        await asyncio.wait_for(asyncio.gather(*(r.done for r in requests)), WATCH_TIMEOUT)
    except TimeoutError:
        return "no answer"
    for request in requests:
        if request.answer != "watching":
            return request.answer or "connection lost"
    return None
