"""``loadout serve`` owns what it starts (DESIGN.md, "Supervision"), tried on
the embedded default as a newcomer runs it: everything it listens on is on
loopback, a second server on the same data directory refuses to start, and
a ``kill -9`` of its Redis or its PostgreSQL heals with no operator."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e.support import Client, free_port, new_user
from tests.e2e.test_embedded_serve import LOADOUT, _alive, _Server, _start, _tree

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _listening(pid: int) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket the tree listens on."""
    tree = {p.pid: p for p in [psutil.Process(pid), *_tree(pid)]}
    out = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in tree:
            out.append((conn.laddr.ip, conn.laddr.port, tree[conn.pid].name()))
    return out


def _child(pid: int, word: str) -> psutil.Process:
    """The server's own child (the postmaster, not a backend) whose command
    starts with a program named ``word``."""
    for p in psutil.Process(pid).children():
        cmd = p.cmdline()
        if cmd and word in Path(cmd[0]).name and p.status() != psutil.STATUS_ZOMBIE:
            return p
    raise AssertionError(f"no {word} under pid {pid}")


def _metric(port: int, name: str, labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f"{name}{{{labels}}}"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _until(what: str, seconds: float, attempt: Any) -> Any:
    """Call ``attempt`` until it returns something true; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await attempt()
            if last:
                return last
        except Exception as exc:
            last = exc
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what} not within {seconds} s: {last!r}")


@pytest.mark.skipif(not LOADOUT.exists(), reason="the loadout script is not installed")
async def test_the_embedded_server_listens_on_loopback_and_heals_its_services(
    tmp_path: Path,
) -> None:
    data_dir, port, log = tmp_path / "d", free_port(), tmp_path / "serve.log"
    http_port = free_port()
    data_dir.mkdir()
    process = _start(data_dir, port, log, http_port)
    started: list[psutil.Process] = []
    try:
        started = _tree(process.pid)
        server = _Server(data_dir, port)
        # Everything the embedded default starts listens on loopback only,
        # and Ray keeps its files under the data directory.
        listening = _listening(process.pid)
        assert listening and {ip for ip, _, _ in listening} <= LOOPBACK, listening
        assert (data_dir / "ray").exists()

        # A second server on the same data directory refuses, naming the first.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LOADOUT_", "RAY_"))}
        env.update(
            LOADOUT_DATA_DIR=str(data_dir),
            LOADOUT_PORT=str(free_port()),
            LOADOUT_HTTP_PORT=str(free_port()),
        )
        second = await asyncio.to_thread(
            subprocess.run,
            [str(LOADOUT), "serve"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1
        assert f"in use by pid {process.pid}" in second.stderr, second.stderr
        user = new_user()
        async with await Client.open(server, user) as c:
            assert (await c.request({"type": "state"}))["balance"] == 100

        # Redis killed: new connections are still welcomed, pushes resume.
        redis = _child(process.pid, "redis-server")
        redis.kill()
        welcomed = await _until(
            "a connection while Redis restarts", 10, lambda: Client.open(server, user)
        )
        await welcomed.close()

        async def pushed() -> bool:
            async with await Client.open(server, user) as a, await Client.open(server, user) as b:
                key = f"heal-{time.monotonic_ns()}"
                reply = await a.request(
                    {"type": "purchase", "key": key, "sku": "plat.booster.xp", "price": 5}
                )
                assert reply["type"] == "purchased", reply
                push = await b.push("inventory", timeout=2, version=reply["version"])
                return bool(push["balance"] == reply["balance"])

        await _until("pushes after Redis came back", 10, pushed)
        assert _metric(http_port, "loadout_dependency_restarts_total", 'dependency="redis"') == 1

        # PostgreSQL killed: started again, and changes are made again.
        _child(process.pid, "postgres").kill()

        async def restarted() -> bool:
            labels = 'dependency="postgresql"'
            return _metric(http_port, "loadout_dependency_restarts_total", labels) == 1

        await _until("PostgreSQL started again", 15, restarted)
        async with await Client.open(server, user) as c:

            async def granted() -> bool:
                reply = await c.request(
                    {"type": "consume", "key": "pg-heal", "sku": "plat.booster.xp"}
                )
                return bool(reply["type"] == "consumed")

            await _until("a change after PostgreSQL came back", 15, granted)
            again = await c.request({"type": "consume", "key": "pg-heal", "sku": "plat.booster.xp"})
            assert again["type"] == "consumed"  # the same key: the original outcome
        started = _tree(process.pid)

        process.send_signal(signal.SIGTERM)
        assert process.wait(90) == 0
        assert "drained" in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for p in _alive(started):
            p.kill()
