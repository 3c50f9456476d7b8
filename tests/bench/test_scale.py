"""The bench's scale options: the paced mode (``--pace``), service watchers
(``--watchers``), opening connections in a window, the load generator's own
open-file limit, and the server's memory and CPU samples.  Against a
stand-in shop on port 0 and, once, a real server.  It asserts no timing."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from bench.load import WorkerPlan, run_worker
from bench.main import _seconds
from bench.probe import ServerProbe
from bench.watch import WATCH_BATCH
from tests.bench.test_smoke import _bench

REPO = Path(__file__).resolve().parents[2]
SUBPROTOCOL = "loadout.v1.msgpack"
CHANGES = {"purchase": "inventory", "equip": "loadout", "unequip": "loadout"}


class _WatchShop:
    """Answers players' requests (a change bumps the user's version) and
    ``watch`` from service tokens; pushes each change, with ``user``, to the
    connections watching its user.  ``refuse`` answers ``watch`` with an error."""

    def __init__(self, refuse: str | None = None) -> None:
        self.refuse = refuse
        self.versions: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()  # user -> requests after set-up
        self.watch_sizes: list[int] = []
        self.watchers: dict[str, list[WSTransport]] = defaultdict(list)
        self.open = 0

    def listener(self, request: WSUpgradeRequest) -> WSUpgradeResponseWithListener | None:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        kind, _, name = token.partition("-")
        if kind not in ("token", "service"):
            return None
        response = WSUpgradeResponse.create_101_response({"Sec-WebSocket-Protocol": SUBPROTOCOL})
        return WSUpgradeResponseWithListener(response, _Client(self, name, kind == "service"))


class _Client(WSListener):
    def __init__(self, shop: _WatchShop, user: str, service: bool) -> None:
        super().__init__()
        self.shop, self.user, self.service = shop, user, service

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.shop.open += 1
        transport.send(WSMsgType.BINARY, msgspec.msgpack.encode({"type": "welcome"}))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.shop.open -= 1

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            return
        request: dict[str, Any] = msgspec.msgpack.decode(frame.get_payload_as_bytes())
        kind, shop = request["type"], self.shop
        reply: dict[str, Any] = {"type": kind, "rid": request["rid"]}
        push = None
        if kind == "watch":
            if self.shop.refuse:
                reply = {"type": "error", "rid": request["rid"], "code": shop.refuse}
            else:
                reply["type"] = "watching"
                shop.watch_sizes.append(len(request["users"]))
                for user in request["users"]:
                    shop.watchers[user].append(transport)
        else:
            if request.get("key") != "bench-frame":
                shop.requests[self.user] += 1
            if kind in CHANGES:
                shop.versions[self.user] += 1
                reply["version"] = shop.versions[self.user]
                push = {"type": CHANGES[kind], "version": reply["version"], "user": self.user}
        transport.send(WSMsgType.BINARY, msgspec.msgpack.encode(reply))
        if push is not None:
            for watcher in shop.watchers[self.user]:
                if not watcher.is_disconnected:
                    watcher.send(WSMsgType.BINARY, msgspec.msgpack.encode(push))


@asynccontextmanager
async def _serve(shop: _WatchShop) -> AsyncIterator[str]:
    server = await ws_create_server(shop.listener, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"ws://127.0.0.1:{port}/v1/ws"
    finally:
        server.close()
        await server.wait_closed()


def _plan(url: str, cold: list[str], **extra: Any) -> WorkerPlan:
    plan = WorkerPlan(
        index=0, url=url, tokens={u: f"token-{u}" for u in cold}, cold=cold, hot=[],
        watched=[], depth=1, rate=None, warmup=0.2, duration=1.0, mix=(0.6, 0.3, 0.1),
        hot_share=0.0, run_id="t", seed=3, connect_window=2,
    )  # fmt: skip
    for key, value in extra.items():
        setattr(plan, key, value)
    return plan


def test_pace_is_a_duration_in_seconds() -> None:
    assert [_seconds(t) for t in ("20s", "20", "500ms", "2m", " 1.5s ")] == [
        20.0, 20.0, 0.5, 120.0, 1.5,
    ]  # fmt: skip
    for bad in ("", "s", "soon", "0", "-1s", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            _seconds(bad)


async def test_paced_connections_each_send_and_are_answered() -> None:
    """A pace of 0.1 s over 1 s sends several requests from every connection
    (the first within the first interval), more than a window's worth of
    connections opened a couple at a time, all answered."""
    shop = _WatchShop()
    users = [f"u{i}" for i in range(7)]
    async with _serve(shop) as url:
        result = await asyncio.wait_for(run_worker(_plan(url, users, pace=0.1)), 30)
    assert result.setup_errors == []
    assert (result.connected, result.connect_failures) == (7, 0)
    assert result.errors == {}
    assert result.unanswered == 0
    assert set(shop.requests) == set(users), "a paced connection sent nothing"
    assert result.sent == sum(shop.requests.values())
    assert result.cpu_seconds > 0 and result.rss_bytes > 0


async def test_watchers_see_every_change_and_their_latency_is_measured() -> None:
    shop = _WatchShop()
    users = ["alice", "bob", "carol"]
    others = [f"far-{i}" for i in range(2 * WATCH_BATCH + 40)]  # watched, never driven
    async with _serve(shop) as url:
        plan = _plan(
            url, users, rate=60.0, service_tokens=["service-w0", "service-w1"],
            watch_users=[*users, *others],
        )  # fmt: skip
        result = await asyncio.wait_for(run_worker(plan), 30)
    assert result.setup_errors == []
    assert result.connected == 5  # three players, two watchers
    # Each watcher watches its half, at most WATCH_BATCH users per request.
    assert sorted(shop.watch_sizes) == [21, 22, WATCH_BATCH, WATCH_BATCH]
    assert max(shop.watch_sizes) <= WATCH_BATCH
    assert result.watch_latencies, "no watcher push was matched with its change"
    assert len(result.watch_latencies) == len(result.watch_after_reply)
    changes = sum(result.ok[k] for k in CHANGES)
    assert len(result.watch_latencies) + result.missing_watch_pushes == changes
    assert shop.open == 0  # every connection closed at the end


async def test_a_refused_watch_is_a_setup_error_and_its_watcher_is_closed() -> None:
    shop = _WatchShop(refuse="forbidden")
    async with _serve(shop) as url:
        plan = _plan(url, ["alice"], rate=20.0, service_tokens=["service-w0"],
                     watch_users=["alice"])  # fmt: skip
        result = await asyncio.wait_for(run_worker(plan), 30)
    assert result.setup_errors == ["watch by watcher-0.0: error:forbidden"]
    assert result.watch_latencies == []
    assert result.ok["purchase"] + result.ok["equip"] > 0  # the load went on


async def test_failed_connections_are_counted() -> None:
    shop = _WatchShop()
    async with _serve(shop) as url:
        plan = _plan(url, ["alice", "bob"], pace=0.5)
        plan.tokens["bob"] = "nobody"  # refused at the handshake (404)
        result = await asyncio.wait_for(run_worker(plan), 30)
    assert (result.connected, result.connect_failures) == (1, 1)
    assert len(result.setup_errors) == 1 and result.setup_errors[0].startswith("connect bob:")


def test_a_load_generator_raises_its_own_open_file_limit() -> None:
    """A worker for 3,000 sockets under a soft limit of 1,024 raises it."""
    script = (
        "import resource\n"
        "from bench.load import WorkerPlan, raise_own_fd_limit\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit("
        "resource.RLIMIT_NOFILE)[1]))\n"
        "cold = [f'u{i}' for i in range(3000)]\n"
        "plan = WorkerPlan(index=0, url='', tokens={}, cold=cold, hot=[], watched=[], depth=1,"
        " rate=None, warmup=0, duration=0, mix=(1, 0, 0), hot_share=0, run_id='', seed=0)\n"
        "print(raise_own_fd_limit(plan), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip("the hard open-file limit is below 4096")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    needed, soft = map(int, done.stdout.split())
    assert needed == 3000 + 256
    assert soft >= needed


def test_the_probe_samples_a_process_tree() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        probe = ServerProbe(os.getpid())
        first = probe.mark("from")
        sum(i * i for i in range(200_000))  # some CPU time for the second sample
        last = probe.mark("to")
    finally:
        child.kill()
        child.wait()
    assert child.pid in first.cpu and os.getpid() in first.cpu
    assert first.processes >= 2 and first.rss > first.gateway_rss > 0
    assert first.names[os.getpid()] == "gateway"
    cpu = probe.cpu_between("from", "to")
    assert set(cpu) == {"seconds", "percent", "by_process"}
    assert last.cpu[os.getpid()] >= first.cpu[os.getpid()]
    assert probe.cpu_between("to", "from") == {}  # not in order: nothing


def test_bench_paced_with_watchers_on_a_real_server(tmp_path: Path) -> None:
    document = _bench(
        tmp_path, "--connections", "6", "--users", "12", "--pace", "0.3s", "--watchers", "2",
        "--procs", "2", "--duration", "2", "--warmup", "0.5", "--push-sample", "0.5",
    )  # fmt: skip
    (run,) = document["runs"]
    assert run["settings"]["pace"] == 0.3
    assert run["setup_errors"] == []
    assert run["errors"] == {}
    assert run["unanswered"] == 0
    scale = run["scale"]
    # 6 players, round(3 x 0.5) = 2 push-sample connections per process, 2 watchers.
    assert scale["connections"] == {
        "established": 12, "failed": 0, "seconds_to_open": scale["connections"]["seconds_to_open"],
        "counted_by_server": 12,
    }  # fmt: skip
    server = scale["server"]
    assert server["rss_open"] > 0 and server["gateway_rss_open"] > 0
    assert "per_connection_bytes" in server  # its value is not judged here
    assert server["cpu"]["by_process"].get("gateway", 0) > 0
    assert any(name.startswith("ray::") for name in server["cpu"]["by_process"])
    assert scale["watch"]["count"] > 0, "the service watchers saw no push"
    assert scale["client"]["processes"] == 2
