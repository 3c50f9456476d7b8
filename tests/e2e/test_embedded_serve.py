"""``loadout serve`` exactly as a newcomer runs it: the installed console
script, nothing configured, its own PostgreSQL, Redis and Ray under the data
directory.  A kill -9 leaves nothing behind that serves or writes, and the
next start works; SIGTERM stops everything it started."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from server.auth import issue_token
from tests.e2e.support import Client, ServerProcess, free_port, new_user

LOADOUT = Path(sys.executable).parent / "loadout"


def _start(
    data_dir: Path, port: int, log: Path, http_port: int | None = None
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LOADOUT_", "RAY_ADDRESS", "PYTHONPATH"))}  # fmt: skip
    env.update(LOADOUT_DATA_DIR=str(data_dir), LOADOUT_PORT=str(port),
               LOADOUT_HTTP_PORT=str(http_port or free_port()),
               LOADOUT_STARTING_BALANCE="100", RAY_USAGE_STATS_ENABLED="0")  # fmt: skip
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [str(LOADOUT), "serve"], env=env, stdout=out, stderr=subprocess.STDOUT,
            cwd=data_dir.parent,
        )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-4000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return process
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise AssertionError("no health in 120 s:\n" + log.read_text()[-4000:])


def _tree(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


class _Server(ServerProcess):
    """Just enough of ServerProcess for Client.open."""

    def __init__(self, data_dir: Path, port: int) -> None:
        super().__init__(data_dir, None)
        self.port = port

    def token(self, user: str, role=None, ttl: int = 600) -> str:  # type: ignore[no-untyped-def]
        from protocol.messages import Role

        secret = (self.data_dir / "secret").read_text().strip()
        return issue_token(secret, user, role or Role.PLAYER, ttl)


@pytest.mark.skipif(not LOADOUT.exists(), reason="the loadout script is not installed")
async def test_embedded_serve_survives_kill_9_and_stops_clean(tmp_path: Path) -> None:
    data_dir, port, log = tmp_path / "loadout-data", free_port(), tmp_path / "serve.log"
    data_dir.mkdir()
    process = _start(data_dir, port, log)
    started: list[psutil.Process] = []
    try:
        secret = data_dir / "secret"
        assert secret.stat().st_mode & 0o777 == 0o600
        server = _Server(data_dir, port)
        user = new_user()
        async with await Client.open(server, user) as c:
            bought = await c.request(
                {"type": "purchase", "key": "k", "sku": "plat.life.extra", "price": 20}
            )
            assert bought["balance"] == 80
        started = _tree(process.pid)
        names = " ".join(" ".join(p.cmdline()) for p in started)
        assert "postgres" in names and "redis-server" in names and "raylet" in names

        process.send_signal(signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            left = _alive(started)
            if not any("postgres" in " ".join(p.cmdline()) or "redis" in p.name() for p in left):
                break
            await asyncio.sleep(0.2)
        left = _alive(started)
        assert not [p for p in left if "postgres" in " ".join(p.cmdline())], "postgres outlived us"
        assert not [p for p in left if "redis-server" in p.name()], "redis outlived us"
        for _ in range(100):  # Ray's processes, stopped by server/reaper.py
            if not _alive(started):
                break
            await asyncio.sleep(0.2)
        assert _alive(started) == [], "Ray's processes outlived the server"
        assert "Token authentication is enabled" not in log.read_text()  # Ray's warning

        process = _start(data_dir, port, log)  # the next start works...
        assert _alive(started) == [], "leftovers of the killed run are still running"
        async with await Client.open(server, user, binary=True) as c:
            state = await c.request({"type": "state"})  # ...and has the data
            assert state["balance"] == 80 and state["version"] == 2
        started = _tree(process.pid)

        process.send_signal(signal.SIGTERM)
        assert process.wait(90) == 0
        await asyncio.sleep(1)
        assert _alive(started) == [], "SIGTERM left processes running"
        assert "drained" in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for p in _alive(started):
            p.kill()
