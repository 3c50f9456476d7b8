"""The gateway's batcher over a real shard link (an in-process LinkServer in
front of a stand-in host; Ray is only how the batcher finds the endpoint,
and the end-to-end tests cover it)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import msgspec
import pytest

from actors.shard.link import DEAD_AFTER_SECONDS, Endpoint, GatewaySide, LinkServer, _ShardSide
from protocol.messages import State
from server.batching import ShardBatcher
from tests.actors.test_link import Host


class _Method:
    def __init__(self, result: Any) -> None:
        self._result = result

    def remote(self) -> Awaitable[Endpoint]:
        async def call() -> Endpoint:
            if isinstance(self._result, Exception):
                raise self._result
            result: Endpoint = await self._result()
            return result

        return call()


class FakeHandle:
    """Answers ``endpoint.remote()`` the way the shard actor does."""

    def __init__(self, endpoint: Any) -> None:
        self.endpoint = _Method(endpoint)


class Replies:
    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []

    def __call__(self, data: bytes) -> None:
        self.got.append(msgspec.msgpack.decode(data))

    async def count(self, n: int) -> None:
        for _ in range(1000):
            if len(self.got) >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{len(self.got)} replies, wanted {n}")


@pytest.fixture
async def linked() -> AsyncIterator[tuple[ShardBatcher, Host]]:
    host = Host()
    server = LinkServer(0, host.apply_batch)

    async def endpoint() -> Endpoint:
        return await server.start("127.0.0.1")

    batcher = ShardBatcher(0, FakeHandle(endpoint), lambda: 5, timeout=0.5, batch_timeout=0.5)
    await batcher.start()
    try:
        yield batcher, host
    finally:
        await batcher.close()
        await server.close()


async def test_one_loop_turn_is_one_batch_and_one_batch_is_in_flight(
    linked: tuple[ShardBatcher, Host],
) -> None:
    batcher, host = linked
    replies = Replies()
    host.hold.clear()
    for rid in range(3):
        batcher.submit("u", State(rid=rid), replies)
    await asyncio.sleep(0.1)
    for rid in range(3, 5):
        batcher.submit("u", State(rid=rid), replies)
    await asyncio.sleep(0.1)
    assert host.started == [[0, 1, 2]]  # 3 and 4 wait for the reply
    host.hold.set()
    await replies.count(5)
    assert host.started == [[0, 1, 2], [3, 4]]
    assert [r["rid"] for r in replies.got] == [0, 1, 2, 3, 4]
    assert all(r["v"] == 5 for r in replies.got)  # the catalog version travels


async def test_a_timed_out_batch_is_answered_and_the_next_waits_for_it(
    linked: tuple[ShardBatcher, Host],
) -> None:
    batcher, host = linked
    replies = Replies()
    host.hold.clear()
    batcher.submit("u", State(rid=1), replies)
    await replies.count(1)  # after the 0.5 s timeout
    assert replies.got[0]["type"] == "error" and replies.got[0]["code"] == "unavailable"
    batcher.submit("u", State(rid=2), replies)  # goes out on a new link
    await asyncio.sleep(0.3)
    assert host.started == [[1]]  # ... and waits for the lost batch on the shard
    host.hold.set()
    await replies.count(2)
    assert replies.got[1] == {"rid": 2, "v": 5}
    assert host.finished == [[1], [2]]
    await batcher.drain()


async def test_close_answers_what_waits(linked: tuple[ShardBatcher, Host]) -> None:
    batcher, host = linked
    replies = Replies()
    host.hold.clear()
    batcher.submit("u", State(rid=1), replies)
    await asyncio.sleep(0.1)
    batcher.submit("u", State(rid=2), replies)
    await batcher.close()
    assert [(r["rid"], r["code"]) for r in replies.got] == [(1, "unavailable"), (2, "unavailable")]
    batcher.submit("u", State(rid=3), replies)
    assert replies.got[-1]["rid"] == 3 and replies.got[-1]["code"] == "unavailable"
    await batcher.drain()


async def test_no_endpoint_in_time_fails_the_start() -> None:
    batcher = ShardBatcher(0, FakeHandle(ConnectionError("no actor")), lambda: 1, timeout=0.3)
    with pytest.raises(ConnectionError, match="took no link"):
        await batcher.start()
    await batcher.close()


async def test_a_link_that_closes_as_it_opens_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard that dies just after ``endpoint()`` answered: the reset can reach
    the new link before the connecting coroutine resumes (a busy loop turn,
    here a 50 ms sleep).  The batcher must retry, not give up for good."""
    original = GatewaySide.connection_made

    def busy(self: GatewaySide, transport: asyncio.BaseTransport) -> None:
        original(self, transport)
        time.sleep(0.05)

    monkeypatch.setattr(GatewaySide, "connection_made", busy)
    resetting = socket.socket()
    resetting.bind(("127.0.0.1", 0))
    resetting.listen(16)

    def reset_everything() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = resetting.accept()
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()

    threading.Thread(target=reset_everything, daemon=True).start()
    host = Host()
    server = LinkServer(0, host.apply_batch)
    dying = True

    async def endpoint() -> Endpoint:
        if dying:
            return Endpoint("127.0.0.1", resetting.getsockname()[1], b"t" * 16)
        return await server.start("127.0.0.1")

    batcher = ShardBatcher(0, FakeHandle(endpoint), lambda: 5, timeout=2.0)
    try:
        with pytest.raises(ConnectionError):  # no link while the shard resets
            await batcher.start()
        batcher._connecting = asyncio.get_running_loop().create_task(batcher._connect())
        await asyncio.sleep(0.3)
        dying = False  # the shard is back
        await asyncio.wait_for(batcher._linked.wait(), 10)
        replies = Replies()
        batcher.submit("u", State(rid=1), replies)
        await replies.count(1)
        assert replies.got == [{"rid": 1, "v": 5}]
    finally:
        resetting.close()
        await batcher.close()
        await server.close()


async def test_a_slow_batch_keeps_its_link_alive_with_heartbeats(
    linked: tuple[ShardBatcher, Host],
) -> None:
    batcher, host = linked
    batcher._batch_timeout = 3600.0
    replies = Replies()
    host.hold.clear()
    batcher.submit("u", State(rid=1), replies)
    await asyncio.sleep(3 * DEAD_AFTER_SECONDS)  # far past the heartbeat's patience
    assert replies.got == [] and batcher.linked
    host.hold.set()
    await replies.count(1)
    assert replies.got == [{"rid": 1, "v": 5}]


async def test_a_shard_that_falls_silent_is_given_up_by_its_heartbeat(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A node that dies sends no reset: only the heartbeat notices, and the
    batch in flight is answered long before its own (large) timeout."""
    host = Host()
    server = LinkServer(0, host.apply_batch)

    async def endpoint() -> Endpoint:
        return await server.start("127.0.0.1")

    batcher = ShardBatcher(0, FakeHandle(endpoint), lambda: 5, timeout=5.0, batch_timeout=3600.0)
    await batcher.start()
    try:
        host.hold.clear()
        silent = _ShardSide.data_received
        monkeypatch.setattr(_ShardSide, "data_received", lambda self, data: None)
        replies = Replies()
        batcher.submit("u", State(rid=1), replies)
        await replies.count(1)
        assert replies.got[0]["code"] == "unavailable"
        assert "no heartbeat" in caplog.text
        monkeypatch.setattr(_ShardSide, "data_received", silent)
        host.hold.set()
        await asyncio.wait_for(batcher._linked.wait(), 10)  # and it links again
    finally:
        await batcher.close()
        await server.close()


async def test_strangers_holding_connections_open_do_not_lock_a_gateway_out(
    linked: tuple[ShardBatcher, Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    import actors.shard.link as link

    monkeypatch.setattr(link, "_TOKEN_SECONDS", 3600.0)  # strangers never time out here
    batcher, _ = linked
    assert batcher._link is not None
    endpoint = await batcher._handle.endpoint.remote()
    strangers = []
    for _ in range(70):  # more than the shard keeps waiting for a token
        _, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
        strangers.append(writer)
    batcher._link.abort("a test drops the link")  # the gateway must link again now
    await asyncio.sleep(0.1)
    await asyncio.wait_for(batcher._linked.wait(), 5)
    replies = Replies()
    batcher.submit("u", State(rid=1), replies)
    await replies.count(1)
    assert replies.got == [{"rid": 1, "v": 5}]
    for writer in strangers:
        writer.close()


async def test_a_batch_too_large_for_one_frame_goes_in_parts(
    linked: tuple[ShardBatcher, Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.batching as batching

    batcher, host = linked
    monkeypatch.setattr(batching, "MAX_FRAME", 200)
    replies = Replies()
    for rid in range(20):
        batcher.submit("u", State(rid=rid), replies)
    await replies.count(20)
    assert [r["rid"] for r in replies.got] == list(range(20))
    assert len(host.finished) > 1 and sum(len(b) for b in host.finished) == 20
