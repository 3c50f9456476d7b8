"""The Procfile run the way an operator runs it, on a fresh machine.

Its processes are started as a Procfile runner starts them (``sh -c`` with
the ``.env`` settings in the environment), with only their ports and paths
changed: a home directory of the test's own (so no Ray token exists yet),
Ray's files under a temporary directory, free ports.  PostgreSQL and Redis
are external to the gateways (started here, from the same binaries as the
embedded ones), and a second Ray node joins the head, as an operator adds
one.  A purchase through one gateway is pushed to the user's connection on
the other.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from persistence.embedded import EmbeddedPostgres, EmbeddedRedis
from tests.e2e.support import REPO, SECRET, Client, ServerProcess, free_port, fund, new_user

BIN = Path(sys.executable).parent
PROCFILE = REPO / "Procfile"
#: Ports of Ray's own that have fixed defaults or must differ between two
#: nodes on one machine; each node gets free ones.
RAY_NODE_PORTS = (
    "--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
)  # fmt: skip


def procfile(text: str) -> dict[str, str]:
    """The processes of a Procfile: name -> command."""
    found = {}
    for line in text.splitlines():
        if match := re.fullmatch(r"([A-Za-z0-9_-]+):\s*(.+)", line.strip()):
            found[match[1]] = match[2]
    return found


def with_free_ports(commands: dict[str, str]) -> tuple[dict[str, str], dict[int, int]]:
    """The commands with every port (a number after ``=`` or ``:``) replaced
    by a free one, the same number by the same port; and the mapping."""
    ports: dict[int, int] = {}

    def free(match: re.Match[str]) -> str:
        return str(ports.setdefault(int(match[1]), free_port()))

    out = {name: re.sub(r"(?<=[=:])(\d{4,5})\b", free, cmd) for name, cmd in commands.items()}
    return out, ports


def node_ports() -> str:
    return " " + " ".join(f"{flag}={free_port()}" for flag in RAY_NODE_PORTS)


@dataclass
class Operator:
    """What the operator started: process groups, by name, and their logs."""

    cwd: Path
    env: dict[str, str]
    ray_dir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def run(self, name: str, command: str) -> None:
        with open(self.cwd / f"{name}.log", "ab") as log:
            self.processes[name] = subprocess.Popen(
                ["/bin/sh", "-c", command], env=self.env, cwd=self.cwd, stdout=log,
                stderr=subprocess.STDOUT, process_group=0,
            )  # fmt: skip

    def log(self, name: str) -> str:
        return (self.cwd / f"{name}.log").read_text(errors="replace")

    def wait_healthy(self, name: str, port: int, timeout: float = 150) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for other, process in self.processes.items():
                assert process.poll() is None, f"{other} exited:\n{self.log(other)[-4000:]}"
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                    return
            time.sleep(0.5)
        raise AssertionError(f"{name} not ready in {timeout} s:\n{self.log(name)[-4000:]}")

    def stop(self) -> None:
        """SIGTERM each process group, the gateways first; SIGKILL what is
        left, and any process still using this test's Ray directory."""
        for name in sorted(self.processes, key=lambda n: n.startswith("ray")):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.processes[name].pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.processes[name].wait(30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.processes[name].pid, signal.SIGKILL)
            self.processes[name].wait()
        mine = str(self.ray_dir)
        for process in psutil.process_iter(["cmdline"]):
            if any(mine in part for part in process.info["cmdline"] or ()):
                with contextlib.suppress(psutil.Error):
                    process.kill()


@pytest.fixture
def external(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """PostgreSQL and Redis of the operator's own (not the gateways')."""
    pg, redis = EmbeddedPostgres(tmp_path / "pg"), EmbeddedRedis(tmp_path / "redis")
    try:
        yield pg.start(), redis.start()
    finally:
        redis.stop()
        pg.stop()


@pytest.fixture
def operator(tmp_path: Path, external: tuple[str, str]) -> Iterator[Operator]:
    database_url, redis_url = external
    home, cwd = tmp_path / "home", tmp_path / "app"
    home.mkdir()
    cwd.mkdir()
    ray_dir = Path(tempfile.mkdtemp(prefix="lo-ray-"))  # Ray's socket paths must be short
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOADOUT_", "RAY_"))}
    env.update(
        HOME=str(home), RAY_TMPDIR=str(ray_dir), PATH=f"{BIN}:{env.get('PATH', '')}",
        PYTHONPATH=str(REPO),  # ``loadout`` of this tree
        # The operator's .env:
        LOADOUT_DATABASE_URL=database_url, LOADOUT_REDIS_URL=redis_url, LOADOUT_SECRET=SECRET,
    )  # fmt: skip
    started = Operator(cwd, env, ray_dir)
    try:
        yield started
    finally:
        started.stop()
        subprocess.run(["rm", "-rf", str(ray_dir)], check=False)


@pytest.mark.skipif(not (BIN / "ray").exists(), reason="the ray command is not installed")
async def test_the_procfile_runs_as_shipped_with_a_second_ray_node(operator: Operator) -> None:
    commands, ports = with_free_ports(procfile(PROCFILE.read_text()))
    assert set(commands) == {"ray", "gateway1", "gateway2"}, commands
    head = ports[6380]
    operator.run("ray", commands["ray"] + node_ports())
    gateways = []
    for name in ("gateway1", "gateway2"):
        operator.run(name, commands[name])
        port, http_port = _ports_of(commands[name])
        gateways.append((name, port, http_port))
    # A second node joins, as on another machine (RAY_AUTH_MODE=token, the token copied).
    operator.run(
        "ray-node",
        f"sleep 5 && RAY_AUTH_MODE=token ray start --address=127.0.0.1:{head} --num-cpus=1"
        f" --disable-usage-stats --block" + node_ports(),
    )
    for name, _, http_port in gateways:
        operator.wait_healthy(name, http_port)
    assert "Ray runtime started" in operator.log("ray-node"), operator.log("ray-node")

    first, second = (_server(port) for _, port, _ in gateways)
    user = new_user()
    await fund(first, user, 50)
    async with await Client.open(first, user) as on_first:
        async with await Client.open(second, user, binary=True) as on_second:
            bought = await on_first.request(
                {"type": "purchase", "key": "b1", "sku": "plat.booster.xp", "price": 5}
            )
            assert bought["type"] == "purchased", bought
            push = await on_second.push("inventory", version=bought["version"])
            assert push["balance"] == 45
            again = await on_second.request(
                {"type": "purchase", "key": "b2", "sku": "plat.booster.xp", "price": 5}
            )
            assert (await on_first.push("inventory", version=again["version"]))["balance"] == 40
    for name, _, _ in gateways:
        assert "Traceback" not in operator.log(name), operator.log(name)[-4000:]


def _ports_of(command: str) -> tuple[int, int]:
    port = re.search(r"LOADOUT_PORT=(\d+)", command)
    http_port = re.search(r"LOADOUT_HTTP_PORT=(\d+)", command)
    assert port and http_port, command
    return int(port[1]), int(http_port[1])


def _server(port: int) -> ServerProcess:
    """Just enough of a ServerProcess for the test client (its URL and tokens)."""
    server = ServerProcess(Path("/nonexistent"), None)
    server.port = port
    return server
