"""A real server in a subprocess, and a small WebSocket client for tests."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection, connect

from actors.partitions import DEFAULT_PARTITIONS, PartitionMap, initial_owners
from actors.routing import shard_name
from protocol.codec import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL
from protocol.messages import Role
from server.auth import issue_token

SECRET = "test-secret-" + "x" * 40
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ServerProcess:
    """``loadout serve`` as a child process on a free port and a data dir.

    ``serve`` is the ``python -m`` module and arguments that run it: another
    server configured the same way, such as the bench's lock baseline
    (``("bench.lock_server",)``), can be run in its place."""

    def __init__(
        self,
        data_dir: Path,
        ray_address: str | None,
        env: Mapping[str, str] | None = None,
        shards: int = 2,
        serve: Sequence[str] = ("server.cli", "serve"),
    ) -> None:
        self.data_dir = data_dir
        self.serve = tuple(serve)
        self.ray_address = ray_address
        self.extra_env = dict(env or {})
        self.shards = shards
        self.port = 0
        self.http_port = 0
        self.namespace = ""
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "server.log"
        self.namespaces: list[str] = []

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LOADOUT_", "RAY_ADDRESS"))}
        env.update(
            LOADOUT_DATA_DIR=str(self.data_dir),
            LOADOUT_PORT=str(self.port),
            LOADOUT_HTTP_PORT=str(self.http_port),
            LOADOUT_SECRET=SECRET,
            LOADOUT_SHARDS=str(self.shards),
            LOADOUT_RAY_NAMESPACE=self.namespace,
            RAY_USAGE_STATS_ENABLED="0",
            PYTHONPATH=str(REPO),
        )
        if self.ray_address:
            env["RAY_ADDRESS"] = self.ray_address
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 90.0, namespace: str | None = None) -> ServerProcess:
        """Start on a new port, in a new Ray namespace (fresh shard actors)
        unless ``namespace`` names another server's, to share its shards."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.http_port = free_port()
        self.namespace = namespace or "t-" + uuid.uuid4().hex[:12]
        if namespace is None:
            self.namespaces.append(self.namespace)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", *self.serve],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.data_dir,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited {self.process.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1):
                    return self
            except OSError:
                time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"server did not come up in {timeout}s:\n{self.tail()}")

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait: the graceful drain."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"server did not stop on SIGTERM:\n{self.tail()}") from None
        self.kill_actors()
        return code

    def kill(self) -> None:
        """SIGKILL: a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def kill_actors(self) -> None:
        """Kill this server's detached shard actors (by handle, in its namespaces)."""
        import ray

        if not ray.is_initialized():
            return
        for namespace in self.namespaces:
            for shard in range(self.shards):
                try:
                    handle = ray.get_actor(shard_name(shard), namespace=namespace)
                except ValueError:
                    continue
                ray.kill(handle)

    def token(self, user: str, role: Role = Role.PLAYER, ttl: int = 600) -> str:
        return issue_token(SECRET, user, role, ttl)

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return subprocess.run(
            [sys.executable, "-m", "server.cli", *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.data_dir,
        )


_rids = itertools.count(1)


@contextlib.contextmanager
def two_gateways(
    root: Path, ray_address: str, env: Mapping[str, str] | None = None
) -> Iterator[tuple[ServerProcess, ServerProcess, dict[str, str]]]:
    """Two gateways sharing shards, PostgreSQL and Redis (the first's embedded
    ones), each with ``env``; yields them and the first's services (URLs).
    Both are killed after, and the shard actors with them."""
    first = ServerProcess(root / "a", ray_address, env=env)
    second: ServerProcess | None = None
    try:
        first.start()
        services = json.loads((root / "a" / "run" / "services.json").read_text())
        shared = {
            "LOADOUT_DATABASE_URL": services["database_url"],
            "LOADOUT_REDIS_URL": services["redis_url"],
        }
        second = ServerProcess(root / "b", ray_address, env={**(env or {}), **shared})
        second.start(namespace=first.namespace)
        yield first, second, services
    finally:
        if second is not None:
            second.kill()
        first.kill()
        first.kill_actors()


class Client:
    """A test client: sends requests, matches replies by rid, keeps pushes."""

    def __init__(self, ws: ClientConnection, binary: bool) -> None:
        self.ws = ws
        self.binary = binary
        self.welcome: dict[str, Any] = {}
        self.pushes: list[dict[str, Any]] = []
        self.replies: dict[Any, dict[str, Any]] = {}

    @classmethod
    async def open(
        cls, server: ServerProcess, user: str, *, binary: bool = False, role: Role = Role.PLAYER
    ) -> Client:
        ws = await connect(
            server.url,
            additional_headers={"Authorization": f"Bearer {server.token(user, role)}"},
            subprotocols=[MSGPACK_SUBPROTOCOL if binary else JSON_SUBPROTOCOL],  # type: ignore[list-item]
            max_size=2**20,
        )
        client = cls(ws, binary)
        client.welcome = await client.recv()
        assert client.welcome["type"] == "welcome", client.welcome
        return client

    async def close(self) -> None:
        await self.ws.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def encode(self, message: Any) -> bytes | str:
        if self.binary:
            return msgspec.msgpack.encode(message)
        return msgspec.json.encode(message).decode()

    async def send(self, message: Any) -> Any:
        """Send a request (adding a rid if it has none); return the rid."""
        if isinstance(message, dict) and "rid" not in message:
            message = {**message, "rid": next(_rids)}
        await self.ws.send(self.encode(message))
        return message.get("rid") if isinstance(message, dict) else None

    async def send_raw(self, frame: bytes | str) -> None:
        await self.ws.send(frame)

    async def recv(self, timeout: float = 20.0) -> dict[str, Any]:
        frame = await asyncio.wait_for(self.ws.recv(), timeout)
        if self.binary:
            assert isinstance(frame, bytes), "msgpack replies come in binary frames"
            decoded: dict[str, Any] = msgspec.msgpack.decode(frame)
        else:
            assert isinstance(frame, str), "json replies come in text frames"
            decoded = msgspec.json.decode(frame)
        return decoded

    async def reply(self, rid: Any, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while rid not in self.replies:
            message = await self.recv(max(0.01, deadline - time.monotonic()))
            if "rid" in message:
                self.replies[message["rid"]] = message
            else:
                self.pushes.append(message)
        return self.replies.pop(rid)

    async def request(self, message: dict[str, Any], timeout: float = 20.0) -> dict[str, Any]:
        return await self.reply(await self.send(message), timeout)

    async def push(self, kind: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        """The first push of this type (and matching fields), waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            for i, message in enumerate(self.pushes):
                if message["type"] == kind and all(message.get(k) == v for k, v in match.items()):
                    return self.pushes.pop(i)
            message = await self.recv(max(0.01, deadline - time.monotonic()))
            if "rid" in message:
                self.replies[message["rid"]] = message
            else:
                self.pushes.append(message)


def first_shard_of(entity_id: str, shards: int) -> int:
    """The shard a new cluster's first map (``LOADOUT_SHARDS`` shards) gives an entity."""
    return PartitionMap(1, initial_owners(DEFAULT_PARTITIONS, shards)).shard_of(entity_id)


def new_user(prefix: str = "u") -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


async def fund(server: ServerProcess, user: str, amount: int) -> dict[str, Any]:
    """Grant gems to a user through an admin connection."""
    async with await Client.open(server, "ops", role=Role.ADMIN) as admin:
        reply = await admin.request(
            {"type": "grant", "user": user, "amount": amount, "key": uuid.uuid4().hex}
        )
    assert reply["type"] == "granted", reply
    return reply
