"""Stops the local Ray's processes when the server that started them dies
without stopping them (``kill -9``), so that no Ray agent outlives it.

``loadout serve`` records its local Ray's processes (pid and start time) in
``<data dir>/run/ray-processes.json`` and starts this module as a small
process of its own session: ``python -m server.reaper <server pid> <file>``.
It checks every half second whether the server is still alive; when it is
gone, it stops the recorded processes that are still the ones recorded (a
reused pid is never touched) and exits.  A clean stop shuts Ray down first,
so then there is nothing left to stop.  The next start also stops what is
recorded (``stop_recorded``), for a reaper that was killed too.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import psutil

__all__ = ["main", "stop_recorded"]

log = logging.getLogger("loadout.reaper")

POLL_SECONDS = 0.5


def stop_recorded(path: Path) -> int:
    """Kill the recorded processes still alive; returns how many."""
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0
    leftovers = []
    for pid, started in recorded:
        try:
            process = psutil.Process(pid)
            if abs(process.create_time() - started) < 0.01:
                leftovers.append(process)
        except psutil.Error:
            continue
    for process in leftovers:
        log.warning("stopping pid %d left over from a previous run", process.pid)
        try:
            process.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(leftovers, timeout=5)
    path.unlink(missing_ok=True)
    return len(leftovers)


def main(argv: list[str] | None = None) -> int:
    server_pid, path = (argv or sys.argv[1:])[:2]
    try:
        server = psutil.Process(int(server_pid))
        started = server.create_time()
    except psutil.Error:
        return 0
    while True:
        try:
            alive = server.is_running() and server.status() != psutil.STATUS_ZOMBIE
            alive = alive and abs(server.create_time() - started) < 0.01
        except psutil.Error:
            alive = False
        if not alive:
            break
        time.sleep(POLL_SECONDS)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stopped = stop_recorded(Path(path))
    if stopped:
        log.warning("the server (pid %s) died: stopped %d Ray processes", server_pid, stopped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
