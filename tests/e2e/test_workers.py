"""``loadout serve --workers 2`` with everything embedded: two gateway
processes on one port, sharing one set of shard actors.  Connections are
spread over both; a change made through one reaches the user's connection on
the other; a worker killed with ``kill -9`` is started again; SIGTERM stops
them all."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.e2e.support import Client, ServerProcess, fund, new_user


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[ServerProcess]:
    """``serve --workers 2`` with its own PostgreSQL, Redis and Ray."""
    server = ServerProcess(tmp_path / "data", None, serve=("server.cli", "serve", "--workers", "2"))
    started: list[psutil.Process] = []
    try:
        server.start(timeout=120)
        assert server.process is not None
        started = psutil.Process(server.process.pid).children(recursive=True)
        yield server
    finally:
        server.kill()
        for process in started:
            if process.is_running():
                process.kill()


def _serving(pid: int, port: int) -> bool:
    try:
        connections = psutil.Process(pid).net_connections("tcp")
    except psutil.Error:
        return False
    return any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in connections)


async def _worker(server: ServerProcess, other_than: int = 0, timeout: float = 90) -> int:
    """The pid of the supervisor's worker once it listens on the port."""
    assert server.process is not None
    supervisor = psutil.Process(server.process.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in supervisor.children():
            try:
                is_worker = "--worker" in child.cmdline()
            except psutil.Error:
                continue
            pid: int = child.pid
            if is_worker and pid != other_than and _serving(pid, server.port):
                return pid
        await asyncio.sleep(0.25)
    raise AssertionError(f"no worker listens on {server.port}:\n{server.tail()}")


def _serving_pid(client: Client, port: int, pids: Iterable[int]) -> int:
    """Which of ``pids`` holds the server end of this client's connection."""
    mine = client.ws.local_address[1]
    for pid in pids:
        for c in psutil.Process(pid).net_connections("tcp"):
            if c.laddr.port == port and c.raddr and c.raddr.port == mine:
                return pid
    raise AssertionError(f"no process among {list(pids)} serves local port {mine}")


async def _one_on_each(server: ServerProcess, user: str, pids: list[int]) -> dict[int, Client]:
    """Open connections for ``user`` until each of ``pids`` serves one; the
    others are closed again.  With SO_REUSEPORT the kernel picks."""
    chosen: dict[int, Client] = {}
    extra: list[Client] = []
    for _ in range(60):
        client = await Client.open(server, user)
        pid = _serving_pid(client, server.port, pids)
        if pid in chosen:
            extra.append(client)
        else:
            chosen[pid] = client
        if len(chosen) == len(pids):
            break
    for client in extra:
        await client.close()
    assert len(chosen) == len(pids), f"60 connections all went to {list(chosen)}"
    return chosen


async def _push_crosses(server: ServerProcess, user: str, via: Client, to: Client, n: int) -> None:
    bought = await via.request(
        {"type": "purchase", "key": f"buy-{n}", "sku": "plat.booster.xp", "price": 5}
    )
    assert bought["type"] == "purchased", bought
    push = await to.push("inventory", version=bought["version"])
    assert push["balance"] == bought["balance"]


async def test_workers_share_the_port_and_the_shards_and_come_back(
    two_workers: ServerProcess,
) -> None:
    server = two_workers
    assert server.process is not None
    supervisor = server.process.pid
    worker = await _worker(server)
    user = new_user()
    await fund(server, user, 100)

    clients = await _one_on_each(server, user, [supervisor, worker])
    try:
        await _push_crosses(server, user, clients[supervisor], clients[worker], 1)
        await _push_crosses(server, user, clients[worker], clients[supervisor], 2)

        os.kill(worker, signal.SIGKILL)
        healed = await _worker(server, other_than=worker)
        await clients.pop(worker).close()
        clients.update(await _one_on_each(server, user, [supervisor, healed]))
        await _push_crosses(server, user, clients[healed], clients[supervisor], 3)
        state = await clients[supervisor].request({"type": "state"})
        assert state["balance"] == 100 - 3 * 5
    finally:
        for client in clients.values():
            await client.close()

    assert server.stop(timeout=90) == 0
    assert not psutil.pid_exists(healed) or psutil.Process(healed).status() == "zombie"
    log = server.log_path.read_text(errors="replace")
    assert "exited with -9; starting it again" in log, server.tail()
