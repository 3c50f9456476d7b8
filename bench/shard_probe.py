"""What ``loadout bench users`` measures of a running server's shards: their
processes' resident memory, their resident users (``/metrics``), and how
long they take to serve again after their processes are killed
(``loadout bench users restart``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import psutil
from websockets.asyncio.client import ClientConnection, connect

from protocol.messages import Role
from server.auth import issue_token
from server.config import Settings

__all__ = ["SUBPROTOCOL", "Sampler", "cmd_restart", "emit", "shard_processes", "timed"]

SUBPROTOCOL = "loadout.v1.msgpack"

# ----------------------------------------------------------- measurements


def shard_processes(server_pid: int) -> list[psutil.Process]:
    """The shard actors' processes among the server's descendants."""
    out = []
    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            if child.cmdline()[:1] and child.cmdline()[0].startswith("ray::ShardActor"):
                out.append(child)
        except psutil.Error:
            continue
    return out


def _shard_rss(server_pid: int | None) -> list[int]:
    if server_pid is None:
        return []
    sizes = []
    for process in shard_processes(server_pid):
        try:
            sizes.append(process.memory_info().rss)
        except psutil.Error:
            continue
    return sizes


_RESIDENT = re.compile(r"^loadout_shard_resident_users\{([^}]*)\} (\S+)$", re.M)
_SHARD = re.compile(r'shard="(\d+)"')


def _residents(metrics: str | None) -> dict[str, int]:
    if not metrics:
        return {}
    with urllib.request.urlopen(metrics, timeout=5) as reply:
        text = reply.read().decode()
    out = {}
    for labels, value in _RESIDENT.findall(text):
        shard = _SHARD.search(labels)
        if shard is not None:
            out[shard.group(1)] = int(float(value))
    return out


class Sampler:
    """Resident users and shard memory, every few seconds, in the background."""

    def __init__(self, args: argparse.Namespace, started: float) -> None:
        self.args, self.started = args, started
        self.samples: list[dict[str, Any]] = []

    async def sample(self, label: str = "") -> dict[str, Any]:
        residents, rss = await asyncio.to_thread(
            lambda: (_residents(self.args.metrics), _shard_rss(self.args.server_pid))
        )
        point = {
            "t": round(time.perf_counter() - self.started, 1),
            "label": label,
            "resident_users": residents,
            "shard_rss_mb": [round(r / 2**20, 1) for r in rss],
            "load_avg": [round(x, 2) for x in psutil.getloadavg()],
        }
        self.samples.append(point)
        return point

    async def run(self, every: float = 5.0) -> None:
        while True:
            await asyncio.sleep(every)
            print(json.dumps(await self.sample()), flush=True)


async def _recv(ws: ClientConnection, rid: int) -> dict[str, Any]:
    while True:
        frame = await asyncio.wait_for(ws.recv(), 30)
        assert isinstance(frame, bytes), "msgpack replies come in binary frames"
        reply: dict[str, Any] = msgspec.msgpack.decode(frame)
        if reply.get("rid") == rid:
            return reply


async def timed(ws: ClientConnection, message: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    await ws.send(msgspec.msgpack.encode(message))
    reply = await _recv(ws, message["rid"])
    return (time.perf_counter() - started) * 1000, reply


def emit(result: dict[str, Any], out: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).write_text(text)


# ------------------------------------------------------------------ restart


def cmd_restart(settings: Settings, args: argparse.Namespace) -> int:
    if args.server_pid is None:
        print("loadout bench users restart: needs --server-pid")
        return 2
    return asyncio.run(_restart(args, Path(args.secret_file).read_text().strip()))


def _probe_users(prefix: str, shards: int, per_shard: int) -> dict[int, list[str]]:
    """Probe user ids by the shard a new cluster's map gives them."""
    from actors.partitions import DEFAULT_PARTITIONS, PartitionMap, initial_owners

    owners = PartitionMap(1, initial_owners(DEFAULT_PARTITIONS, shards))
    found: dict[int, list[str]] = {s: [] for s in range(shards)}
    i = 0
    while any(len(v) < per_shard for v in found.values()):
        uid = f"{prefix}{i}"
        mine = found[owners.shard_of(uid)]
        if len(mine) < per_shard:
            mine.append(uid)
        i += 1
    return found


async def _until_served(ws: ClientConnection, users: list[str], started: float) -> float:
    """Seconds from ``started`` until every user is answered (``inspect``)."""
    rid = 0
    for user in users:
        while True:
            rid += 1
            try:
                _, reply = await timed(ws, {"type": "inspect", "rid": rid, "user": user})
            except TimeoutError:
                continue
            if reply["type"] == "state":
                break
            await asyncio.sleep(0.005)
    return time.perf_counter() - started


async def _restart(args: argparse.Namespace, secret: str) -> int:
    probes = _probe_users(args.users_prefix, args.shards, args.probes)
    token = issue_token(secret, "bench-scale", Role.ADMIN, 3600)
    async with connect(
        args.url, additional_headers={"Authorization": f"Bearer {token}"},
        subprotocols=[SUBPROTOCOL], ping_interval=None,  # type: ignore[list-item]
    ) as ws:  # fmt: skip
        await ws.recv()
        everyone = [u for users in probes.values() for u in users]
        await _until_served(ws, everyone, time.perf_counter())  # resident, before
        victims = shard_processes(args.server_pid)
        if len(victims) != args.shards:
            print(f"found {len(victims)} shard processes, expected {args.shards}")
            return 1
        started = time.perf_counter()
        for process in victims:
            process.send_signal(signal.SIGKILL)
        seconds = await _until_served(ws, everyone, started)
        back = await asyncio.to_thread(_wait_for_new, args.server_pid, victims, args.shards)
    result = {
        "shards_killed": len(victims),
        "until_served_s": round(seconds, 3),
        "new_shard_pids": back,
        "load_avg": [round(x, 2) for x in psutil.getloadavg()],
    }
    emit(result, args.out)
    return 0


def _wait_for_new(server_pid: int, old: list[psutil.Process], shards: int) -> list[int]:
    gone = {p.pid for p in old}
    deadline = time.monotonic() + 30
    pids: list[int] = []
    while time.monotonic() < deadline:
        pids = [p.pid for p in shard_processes(server_pid) if p.pid not in gone]
        if len(pids) >= shards:
            break
        time.sleep(0.2)
    return pids
