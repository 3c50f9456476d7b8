"""What the server under test uses: resident memory and CPU time of its
whole process tree (the gateway process and everything it started: the
embedded PostgreSQL, Redis, Ray and its shard workers), read with psutil.

Resident memory is summed per process, so pages shared between processes
(PostgreSQL's shared buffers, libraries) count once per process: the sum
overstates the total, but the difference between two samples (memory per
connection) is what a connection adds.  CPU is the time the processes spent
between two samples over the wall time between them, in percent of one core
(the machine has ``os.cpu_count()`` of them); a process that exits between
the two samples takes its time with it."""

from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import psutil

__all__ = ["ServerProbe", "TreeSample", "server_connections"]


@dataclass
class TreeSample:
    at: float  # time.monotonic()
    rss: int  # the whole tree
    gateway_rss: int  # the server's own process (the WebSockets live there)
    processes: int
    cpu: dict[int, float] = field(default_factory=dict)  # pid -> user+system seconds
    names: dict[int, str] = field(default_factory=dict)  # pid -> what it is


class ServerProbe:
    """Samples of the process tree rooted at ``pid``."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.marks: dict[str, TreeSample] = {}

    def sample(self) -> TreeSample:
        out = TreeSample(time.monotonic(), 0, 0, 0)
        for process in [self.root, *self.root.children(recursive=True)]:
            try:
                with process.oneshot():
                    rss = process.memory_info().rss
                    times = process.cpu_times()
                    name = "gateway" if process.pid == self.root.pid else _name(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            out.rss += rss
            out.processes += 1
            if process.pid == self.root.pid:
                out.gateway_rss = rss
            out.cpu[process.pid] = times.user + times.system
            out.names[process.pid] = name
        return out

    def mark(self, name: str) -> TreeSample:
        sample = self.marks[name] = self.sample()
        return sample

    def cpu_between(self, first: str, last: str) -> dict[str, Any]:
        """CPU percent (of one core) between two marks: the tree's, and by
        kind of process (``gateway``, ``postgres``, ``redis-server``,
        ``ray::ShardActor``...)."""
        a, b = self.marks.get(first), self.marks.get(last)
        if a is None or b is None or b.at <= a.at:
            return {}
        wall = b.at - a.at
        by_name: dict[str, float] = {}
        for pid, seconds in b.cpu.items():
            spent = seconds - a.cpu.get(pid, 0.0)  # a process born in between: all of it
            name = b.names[pid]
            by_name[name] = by_name.get(name, 0.0) + spent
        return {
            "seconds": round(wall, 2),
            "percent": round(100 * sum(by_name.values()) / wall, 1),
            "by_process": {
                n: round(100 * s / wall, 1)
                for n, s in sorted(by_name.items(), key=lambda item: -item[1])
                if s > 0
            },
        }


def _name(process: psutil.Process) -> str:
    """A process's kind: Ray names its workers in their command line."""
    name = str(process.name())
    if name.startswith("ray::"):
        return name
    try:
        cmdline = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return name
    if cmdline and str(cmdline[0]).startswith("ray::"):
        return str(cmdline[0]).split()[0]
    return name


def server_connections(port: int) -> int | None:
    """The open WebSockets the server counts (``loadout_connections`` on
    ``/metrics``), or None if it cannot be read."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("loadout_connections "):
            return int(float(line.split()[1]))
    return None
