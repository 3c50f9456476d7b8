"""The gateway's WebSocket handling, in process, on a real socket.

The shards are replaced by ``HeldBackend``, which answers only when the test
says so: these tests are about framing and flow control in the gateway, and
the end-to-end path is covered by tests/e2e.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from actors.catalog import Catalog, demo_catalog_text, parse_catalog
from actors.host import ShardRequest
from protocol.codec import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL
from server.auth import issue_token
from server.gateway import Gateway, GatewayLimits
from server.ratelimit import RateLimiter

SECRET = "gateway-test-secret-" * 3


class HeldBackend:
    """Records what the gateway submits and answers it on ``release``."""

    def __init__(self) -> None:
        self.submitted: list[tuple[str, ShardRequest, asyncio.Future[bytes]]] = []

    def submit(self, user_id: str, request: ShardRequest) -> asyncio.Future[bytes]:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.submitted.append((user_id, request, future))
        return future

    def release(self) -> int:
        count = 0
        for _, request, future in self.submitted:
            if not future.done():
                future.set_result(msgspec.msgpack.encode({"type": "test", "rid": request.rid}))
                count += 1
        return count

    async def drain(self) -> None:
        pass

    async def close(self) -> None:
        pass


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[Gateway, HeldBackend]]:
    backend = HeldBackend()
    catalog = Catalog.from_document(1, parse_catalog(demo_catalog_text()))
    gateway = Gateway(SECRET, backend, lambda: catalog, RateLimiter(10**9, 10**9))
    await gateway.start("127.0.0.1", 0)
    try:
        yield gateway, backend
    finally:
        await gateway.stop_accepting()
        await gateway.close_all()


async def _open(gateway: Gateway, user: str, binary: bool = False) -> ClientConnection:
    ws = await connect(
        f"ws://127.0.0.1:{gateway.port}/v1/ws",
        additional_headers={"Authorization": f"Bearer {issue_token(SECRET, user)}"},
        subprotocols=[MSGPACK_SUBPROTOCOL if binary else JSON_SUBPROTOCOL],  # type: ignore[list-item]
    )
    welcome = msgspec.json.decode(await ws.recv()) if not binary else None
    assert binary or welcome["type"] == "welcome"
    return ws


async def _wait_for(condition: object, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.01)


async def test_a_fragmented_message_is_one_request(
    gateway: tuple[Gateway, HeldBackend],
) -> None:
    gw, backend = gateway
    ws = await _open(gw, "frag")
    await ws.send(['{"type":"sta', 'te","rid":', "7}"])  # three frames, one message
    await _wait_for(lambda: len(backend.submitted) == 1)
    assert backend.submitted[0][1].rid == 7
    backend.release()
    assert msgspec.json.decode(await ws.recv()) == {"type": "test", "rid": 7}
    await ws.close()


async def test_a_fragmented_message_over_64_kib_closes_1009(
    gateway: tuple[Gateway, HeldBackend],
) -> None:
    gw, backend = gateway
    ws = await _open(gw, "bigfrag")
    part = "x" * (40 * 1024)  # each frame is under the limit; the message is not
    await ws.send(['{"type":"state","pad":"', part, part, '"}'])
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    assert backend.submitted == []


async def test_text_that_is_not_utf8_closes_1007(gateway: tuple[Gateway, HeldBackend]) -> None:
    gw, backend = gateway
    ws = await _open(gw, "utf")
    await ws.send(b'{"type":"state","rid":"\xff\xfe"}', text=True)
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007
    assert backend.submitted == []


async def test_past_the_in_flight_limit_requests_wait_in_order(
    gateway: tuple[Gateway, HeldBackend],
) -> None:
    gw, backend = gateway
    ws = await _open(gw, "pipeline", binary=True)
    assert msgspec.msgpack.decode(await ws.recv())["type"] == "welcome"
    total = GatewayLimits.in_flight * 2 + 50
    for rid in range(total):
        await ws.send(msgspec.msgpack.encode({"type": "state", "rid": rid}))
    await _wait_for(lambda: len(backend.submitted) == GatewayLimits.in_flight)
    await asyncio.sleep(0.2)  # nothing more gets through while they are in flight
    assert len(backend.submitted) == GatewayLimits.in_flight
    rids: list[int] = []
    while len(rids) < total:
        backend.release()
        rids.append(msgspec.msgpack.decode(await asyncio.wait_for(ws.recv(), 10))["rid"])
    assert rids == list(range(total))
    assert [request.rid for _, request, _ in backend.submitted] == list(range(total))
    await ws.close()


async def test_requests_sent_before_the_welcome_wait_for_it(
    gateway: tuple[Gateway, HeldBackend],
) -> None:
    gw, backend = gateway
    subscribed = asyncio.Event()

    async def slow_subscription(user: str) -> None:
        await subscribed.wait()

    gw.on_connection = slow_subscription
    ws = await connect(
        f"ws://127.0.0.1:{gw.port}/v1/ws",
        additional_headers={"Authorization": f"Bearer {issue_token(SECRET, 'early')}"},
    )
    await ws.send('{"type":"state","rid":1}')
    await asyncio.sleep(0.2)
    assert backend.submitted == []  # held until the user's pushes are subscribed
    subscribed.set()
    assert msgspec.json.decode(await ws.recv())["type"] == "welcome"
    await _wait_for(lambda: len(backend.submitted) == 1)
    backend.release()
    assert msgspec.json.decode(await ws.recv()) == {"type": "test", "rid": 1}
    await ws.close()


async def test_a_close_from_the_client_is_answered_and_forgotten(
    gateway: tuple[Gateway, HeldBackend],
) -> None:
    gw, _ = gateway
    ws = await _open(gw, "bye")
    assert gw.connections == 1
    await ws.close(1000, "done")
    assert ws.close_code == 1000
    await _wait_for(lambda: gw.connections == 0 and not gw.clients)
