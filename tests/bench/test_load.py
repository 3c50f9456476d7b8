"""The load generator's client against a stand-in shop on port 0: what it
sends, how it reads fragmented replies and pushes, and what a lost connection
counts as.  It asserts no timing."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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

SUBPROTOCOL = "loadout.v1.msgpack"


class _Shop:
    """Answers every request with a reply of the same type, split in two
    fragments, and pushes ``inventory`` to all of a buyer's connections.  With
    ``drop_after``, the user ``dropped`` loses its connection at the first
    request that many seconds into the load, without a reply or a CLOSE."""

    def __init__(self, drop_after: float | None = None) -> None:
        self.drop_after = drop_after
        self.load_started: float | None = None
        self.connections: dict[str, list[WSTransport]] = defaultdict(list)
        self.versions: dict[str, int] = defaultdict(int)
        self.dropped = 0

    def listener(self, request: WSUpgradeRequest) -> WSUpgradeResponseWithListener | None:
        token = request.headers.get("Authorization", "")
        if not token.startswith("Bearer token-"):
            return None  # 404: the client did not authenticate as the bench does
        if SUBPROTOCOL not in request.headers.get("Sec-WebSocket-Protocol", ""):
            return None
        response = WSUpgradeResponse.create_101_response({"Sec-WebSocket-Protocol": SUBPROTOCOL})
        return WSUpgradeResponseWithListener(
            response, _Counter(self, token.removeprefix("Bearer token-"))
        )


class _Counter(WSListener):
    """One connection to the stand-in shop."""

    def __init__(self, shop: _Shop, user: str) -> None:
        super().__init__()
        self.shop = shop
        self.user = user

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.shop.connections[self.user].append(transport)
        transport.send(WSMsgType.BINARY, msgspec.msgpack.encode({"type": "welcome"}))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            return
        request: dict[str, Any] = msgspec.msgpack.decode(frame.get_payload_as_bytes())
        shop = self.shop
        if request.get("key") != "bench-frame" and shop.load_started is None:
            shop.load_started = time.perf_counter()
        if (
            self.user == "dropped"
            and shop.drop_after is not None
            and shop.load_started is not None
            and time.perf_counter() - shop.load_started > shop.drop_after
        ):
            shop.dropped += 1
            transport.disconnect(graceful=False)
            return
        reply: dict[str, Any] = {"type": request["type"], "rid": request["rid"]}
        if request["type"] == "purchase":
            shop.versions[self.user] += 1
            reply["version"] = shop.versions[self.user]
        encoded = msgspec.msgpack.encode(reply)
        transport.send(WSMsgType.BINARY, encoded[:3], fin=False)
        transport.send(WSMsgType.CONTINUATION, encoded[3:], fin=True)
        if request["type"] == "purchase":
            push = msgspec.msgpack.encode({"type": "inventory", "version": reply["version"]})
            for connection in shop.connections[self.user]:
                if not connection.is_disconnected:
                    connection.send(WSMsgType.BINARY, push)


@asynccontextmanager
async def _serve(shop: _Shop) -> AsyncIterator[str]:
    server = await ws_create_server(shop.listener, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"ws://127.0.0.1:{port}/v1/ws"
    finally:
        server.close()
        await server.wait_closed()


def _plan(url: str, cold: list[str], *, rate: float | None = None) -> WorkerPlan:
    users = [*cold, "hot"]
    return WorkerPlan(
        index=0, url=url, tokens={u: f"token-{u}" for u in users}, cold=cold, hot=["hot"],
        watched=cold[:1], depth=2, rate=rate, warmup=0.2, duration=1.0, mix=(0.7, 0.2, 0.1),
        hot_share=0.5, run_id="t", seed=1,
    )  # fmt: skip


@pytest.mark.parametrize("rate", [None, 200.0], ids=["closed-loop", "open-loop"])
async def test_replies_in_fragments_and_pushes_are_measured(rate: float | None) -> None:
    shop = _Shop()
    async with _serve(shop) as url:
        result = await asyncio.wait_for(run_worker(_plan(url, ["alice", "bob"], rate=rate)), 30)
    assert result.setup_errors == []
    assert result.errors == {}
    assert result.unanswered == 0
    assert {"purchase", "equip", "unequip", "state"} <= set(result.ok)
    assert sum(result.ok.values()) == sum(len(v) for v in result.latencies.values())
    assert result.push_latencies, "the watcher saw no inventory push"
    assert shop.versions["hot"] > 0, "no purchase went to the hot user"


async def test_a_lost_connection_counts_its_requests_as_unanswered() -> None:
    shop = _Shop(drop_after=0.5)  # inside the window: 0.2 s warm-up, then 1 s
    async with _serve(shop) as url:
        result = await asyncio.wait_for(run_worker(_plan(url, ["alice", "dropped"])), 30)
    assert shop.dropped >= 1
    assert result.setup_errors == []
    assert result.errors == {}
    assert 1 <= result.unanswered <= 2  # what was in flight: depth 2
    assert result.ok["purchase"] > 0  # the other connections went on
