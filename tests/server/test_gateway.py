"""The gateway's WebSocket handling, in process, on a real socket.

The shards are replaced by ``HeldBackend``, which answers only when the test
says so: these tests are about framing and flow control in the gateway, and
the end-to-end path is covered by tests/e2e.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import struct
from collections.abc import AsyncIterator

import msgspec
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from actors.catalog import Catalog, demo_catalog_text, parse_catalog
from actors.shard.records import ShardRequest
from protocol.codec import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL
from server.auth import issue_token
from server.batching import Answer, Backend
from server.gateway import Gateway, GatewayLimits
from server.ratelimit import RateLimiter

SECRET = "gateway-test-secret-" * 3


class HeldBackend:
    """Records what the gateway submits and answers it on ``release``."""

    def __init__(self) -> None:
        self.submitted: list[tuple[str, ShardRequest, Answer]] = []
        self.answered = 0

    def submit(self, user_id: str, request: ShardRequest, reply: Answer) -> None:
        self.submitted.append((user_id, request, reply))

    def release(self) -> int:
        waiting, self.answered = self.submitted[self.answered :], len(self.submitted)
        for _, request, reply in waiting:
            reply(msgspec.msgpack.encode({"type": "test", "rid": request.rid}))
        return len(waiting)

    async def drain(self) -> None:
        pass

    async def close(self) -> None:
        pass


@contextlib.asynccontextmanager
async def serving(
    backend: Backend,
    limits: GatewayLimits | None = None,
    max_connections: int = 20_000,
    secret: str = SECRET,
) -> AsyncIterator[Gateway]:
    """A gateway on a free port over ``backend``, with the demo catalog and no
    rate limit; closed after."""
    catalog = Catalog.from_document(1, parse_catalog(demo_catalog_text()))
    gateway = Gateway(
        secret, backend, lambda: catalog, RateLimiter(10**9, 10**9), max_connections,
        limits=limits,
    )  # fmt: skip
    await gateway.start("127.0.0.1", 0)
    try:
        yield gateway
    finally:
        await gateway.stop_accepting()
        await gateway.close_all()


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[Gateway, HeldBackend]]:
    backend = HeldBackend()
    async with serving(backend) as gateway:
        yield gateway, backend


async def _open(
    gateway: Gateway, user: str, binary: bool = False, welcome: bool = True
) -> ClientConnection:
    """A connection; with ``welcome``, once the welcome has been read."""
    ws = await connect(
        f"ws://127.0.0.1:{gateway.port}/v1/ws",
        additional_headers={"Authorization": f"Bearer {issue_token(SECRET, user)}"},
        subprotocols=[MSGPACK_SUBPROTOCOL if binary else JSON_SUBPROTOCOL],  # type: ignore[list-item]
    )
    if welcome:
        decode = msgspec.msgpack.decode if binary else msgspec.json.decode
        assert decode(await ws.recv())["type"] == "welcome"
    return ws


def _hold_subscriptions(gateway: Gateway) -> asyncio.Event:
    """Make new connections' push subscriptions wait until the event is set."""
    subscribed = asyncio.Event()

    async def slow_subscription(user: str) -> None:
        await subscribed.wait()

    gateway.on_connection = slow_subscription
    return subscribed


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
    subscribed = _hold_subscriptions(gw)
    ws = await _open(gw, "early", welcome=False)
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


# ----------------------------------------------------------- raw frames


def _client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked client frame, built by hand to send what websockets would not."""
    mask = os.urandom(4)
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        header = bytes((first, 0x80 | size))
    elif size < 65536:
        header = bytes((first, 0x80 | 126)) + struct.pack("!H", size)
    else:
        header = bytes((first, 0x80 | 127)) + struct.pack("!Q", size)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def _raw_open(
    gateway: Gateway, user: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /v1/ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {issue_token(SECRET, user)}\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert b" 101 " in head.split(b"\r\n")[0], head
    return reader, writer


async def _raw_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first, second = await asyncio.wait_for(reader.readexactly(2), 10)
    size = second & 0x7F
    if size == 126:
        size = struct.unpack("!H", await reader.readexactly(2))[0]
    elif size == 127:
        size = struct.unpack("!Q", await reader.readexactly(8))[0]
    return first & 0x0F, await reader.readexactly(size)


async def _raw_until_close(reader: asyncio.StreamReader) -> tuple[list[int], int | None]:
    """Opcodes of the frames read up to the close frame, and its close code."""
    seen: list[int] = []
    while True:
        opcode, payload = await _raw_frame(reader)
        if opcode == 0x8:
            return seen, struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
        seen.append(opcode)


async def test_an_empty_close_is_answered_with_1000(gateway: tuple[Gateway, HeldBackend]) -> None:
    gw, _ = gateway
    reader, writer = await _raw_open(gw, "emptyclose")
    assert (await _raw_frame(reader))[0] == 0x1  # the welcome
    writer.write(_client_frame(0x8, b""))
    _, code = await _raw_until_close(reader)
    assert code == 1000  # never 0, which RFC 6455 forbids on the wire
    writer.close()


async def test_frames_after_a_close_are_not_dispatched(
    gateway: tuple[Gateway, HeldBackend],
) -> None:
    gw, backend = gateway
    reader, writer = await _raw_open(gw, "afterclose")
    assert (await _raw_frame(reader))[0] == 0x1
    bad_text = _client_frame(0x1, b'{"type":"state","rid":"\xff"}')
    writer.write(bad_text + _client_frame(0x1, b'{"type":"state","rid":2}'))  # one read
    _, code = await _raw_until_close(reader)
    assert code == 1007
    await asyncio.sleep(0.1)
    assert backend.submitted == []
    writer.close()


async def test_a_message_in_too_many_fragments_closes_1008(
    gateway: tuple[Gateway, HeldBackend],
) -> None:
    gw, backend = gateway
    reader, writer = await _raw_open(gw, "confetti")
    assert (await _raw_frame(reader))[0] == 0x1
    empty = _client_frame(0x0, b"", fin=False)
    writer.write(_client_frame(0x1, b"{", fin=False) + empty * (GatewayLimits.fragments + 10))
    _, code = await _raw_until_close(reader)
    assert code == 1008
    assert backend.submitted == []
    writer.close()


async def test_pushes_wait_for_the_welcome(gateway: tuple[Gateway, HeldBackend]) -> None:
    gw, _ = gateway
    subscribed = _hold_subscriptions(gw)
    ws = await _open(gw, "pushed", welcome=False)
    await _wait_for(lambda: "pushed" in gw.clients)
    gw.deliver("pushed", msgspec.msgpack.encode({"type": "inventory", "version": 2}))
    gw.broadcast_catalog_changed(9)
    await asyncio.sleep(0.1)
    subscribed.set()
    kinds = [msgspec.json.decode(await asyncio.wait_for(ws.recv(), 10))["type"] for _ in range(3)]
    assert kinds == ["welcome", "inventory", "catalog_changed"]
    await ws.close()


async def test_a_drain_closes_a_busy_client_without_losing_its_replies(
    gateway: tuple[Gateway, HeldBackend],
) -> None:
    gw, backend = gateway
    reader, writer = await _raw_open(gw, "busy")
    assert (await _raw_frame(reader))[0] == 0x1
    # Far past the in-flight limit: most requests wait unread in the server's socket.
    writer.write(_client_frame(0x1, b'{"type":"state","rid":1}') * 3000)
    await writer.drain()
    await _wait_for(lambda: len(backend.submitted) == GatewayLimits.in_flight)
    answered = backend.release()
    await gw.stop_accepting()
    closing = asyncio.get_running_loop().create_task(gw.close_all())
    await asyncio.sleep(0.3)  # the client reads only once the server has closed
    seen, code = await _raw_until_close(reader)  # a reset would raise here instead
    writer.write(_client_frame(0x8, struct.pack("!H", 1000)))
    await closing
    assert len(seen) >= answered  # the replies sent before the close all arrived
    assert code == 1001
    writer.close()


async def test_past_the_in_flight_limit_the_gateway_stops_reading(
    gateway: tuple[Gateway, HeldBackend],
) -> None:
    gw, backend = gateway
    reader, writer = await _raw_open(gw, "flood")
    assert (await _raw_frame(reader))[0] == 0x1
    pad = "x" * 1000
    frame = _client_frame(0x1, f'{{"type":"state","rid":1,"pad":"{pad}"}}'.encode())
    sent = 0
    for _ in range(16):  # 16 MiB: more than the kernel buffers between us hold
        writer.write(frame * 1024)
        sent += 1024
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    (client,) = gw.clients["flood"]
    assert len(backend.submitted) == GatewayLimits.in_flight
    # What was read but not dispatched is one socket read's worth, not the flood:
    # the rest waits in TCP buffers and in our (the client's) write buffer.
    assert len(client.held) < sent // 4, len(client.held)
    assert writer.transport.get_write_buffer_size() > 0
    writer.transport.abort()
