"""The shard link (actors/shard/link.py): framing without sockets, then the shard's
side over a real socket with a stand-in for the host's ``apply_batch``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest

from actors.shard.link import (
    Endpoint,
    FrameError,
    FrameReader,
    LinkServer,
    decode_replies,
    encode_batch,
    frame,
)
from actors.shard.records import BatchItem
from protocol.messages import State

SENDER = b"sender.1"

# ---------------------------------------------------------------- framing


def test_frames_split_across_reads_come_out_whole() -> None:
    data = frame(b"first") + frame(b"") + frame(b"x" * 1000)
    reader = FrameReader()
    out: list[bytes] = []
    for i in range(0, len(data), 7):
        out += reader.feed(data[i : i + 7])
    assert out == [b"first", b"", b"x" * 1000]


def test_many_frames_in_one_read() -> None:
    assert FrameReader().feed(frame(b"a") + frame(b"bc") + frame(b"d")[:3]) == [b"a", b"bc"]


def test_a_frame_over_the_limit_is_refused_from_its_header() -> None:
    reader = FrameReader(limit=10)
    assert reader.feed(frame(b"0123456789")) == [b"0123456789"]
    with pytest.raises(FrameError):
        reader.feed(frame(b"0123456789a")[:4])


def test_the_first_frame_has_its_own_limit_and_the_rest_the_usual_one() -> None:
    reader = FrameReader(limit=100, first_limit=4)
    assert reader.feed(frame(b"tokn") + frame(b"x" * 100)) == [b"tokn", b"x" * 100]
    with pytest.raises(FrameError):
        FrameReader(limit=100, first_limit=4).feed(frame(b"token"))


def test_a_batch_round_trips() -> None:
    items: list[BatchItem] = [("u1", State(rid=1)), ("u2", State(rid="x"))]
    (body,) = FrameReader().feed(encode_batch(7, items, 12))
    assert msgspec.msgpack.decode(body) == [
        7,
        [["u1", {"type": "state", "rid": 1}], ["u2", {"type": "state", "rid": "x"}]],
        12,
    ]
    assert decode_replies(msgspec.msgpack.encode([b"a", b"b"])) == [b"a", b"b"]


# ------------------------------------------------------- the shard's side


class Host:
    """Stands in for ShardHost.apply_batch: records batches, and holds them
    while ``hold`` is clear."""

    def __init__(self) -> None:
        self.started: list[list[object]] = []
        self.finished: list[list[object]] = []
        self.hold = asyncio.Event()
        self.hold.set()

    async def apply_batch(
        self, catalog_version: int, items: list[BatchItem], map_epoch: int = 0
    ) -> list[bytes]:
        rids = [request.rid for _, request in items]
        self.started.append(rids)
        await self.hold.wait()
        self.finished.append(rids)
        return [msgspec.msgpack.encode({"rid": rid, "v": catalog_version}) for rid in rids]


@pytest.fixture
async def shard() -> AsyncIterator[tuple[LinkServer, Endpoint, Host]]:
    host = Host()
    server = LinkServer(0, host.apply_batch)
    endpoint = await server.start("127.0.0.1")
    try:
        yield server, endpoint, host
    finally:
        await server.close()


async def _connect(
    endpoint: Endpoint, token: bytes | None = None, sender: bytes = SENDER
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    writer.write(frame(endpoint.token + sender if token is None else token))
    return reader, writer


async def _reply(reader: asyncio.StreamReader) -> list[dict[str, object]]:
    size = int.from_bytes(await asyncio.wait_for(reader.readexactly(4), 10), "big")
    body = await asyncio.wait_for(reader.readexactly(size), 10)
    return [msgspec.msgpack.decode(r) for r in decode_replies(body)]


def _batch(*rids: int) -> bytes:
    return encode_batch(3, [("u", State(rid=rid)) for rid in rids])


async def test_batches_are_answered_in_order(shard: tuple[LinkServer, Endpoint, Host]) -> None:
    _, endpoint, host = shard
    reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    writer.write(frame(endpoint.token + SENDER) + _batch(1, 2) + _batch(3))  # one write
    assert await _reply(reader) == [{"rid": 1, "v": 3}, {"rid": 2, "v": 3}]
    assert await _reply(reader) == [{"rid": 3, "v": 3}]
    assert host.started == [[1, 2], [3]]
    writer.close()


async def test_a_wrong_token_closes_the_link_and_applies_nothing(
    shard: tuple[LinkServer, Endpoint, Host],
) -> None:
    _, endpoint, host = shard
    reader, writer = await _connect(endpoint, token=b"not the token..")
    writer.write(_batch(1))
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed
    assert host.started == []


async def test_a_long_first_frame_is_not_read_as_a_token(
    shard: tuple[LinkServer, Endpoint, Host],
) -> None:
    _, endpoint, _ = shard
    reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    writer.write((100_000_000).to_bytes(4, "big"))  # before any token: no 100 MB buffered
    assert await asyncio.wait_for(reader.read(), 10) == b""


async def test_an_undecodable_batch_closes_the_link(
    shard: tuple[LinkServer, Endpoint, Host],
) -> None:
    _, endpoint, host = shard
    reader, writer = await _connect(endpoint)
    writer.write(frame(b"\xc1 not msgpack"))
    assert await asyncio.wait_for(reader.read(), 10) == b""
    assert host.started == []


async def test_a_new_link_waits_for_the_batch_a_lost_link_left_running(
    shard: tuple[LinkServer, Endpoint, Host],
) -> None:
    """The gateway reconnects and sends its next batch at once: it must not
    overtake the batch still applying for the lost connection."""
    _, endpoint, host = shard
    host.hold.clear()
    _, first = await _connect(endpoint)
    first.write(_batch(1))
    for _ in range(500):
        if host.started:
            break
        await asyncio.sleep(0.01)
    assert host.started == [[1]]
    first.transport.abort()
    reader, second = await _connect(endpoint)
    second.write(_batch(2))
    await asyncio.sleep(0.2)
    assert host.started == [[1]]  # batch 2 waits for the orphan
    host.hold.set()
    assert await _reply(reader) == [{"rid": 2, "v": 3}]
    assert host.finished == [[1], [2]]
    second.close()


async def _started(host: Host, count: int) -> None:
    for _ in range(500):
        if len(host.started) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(host.started)} batches started, wanted {count}")


async def test_a_new_link_supersedes_the_old_one_even_unseen_dropped(
    shard: tuple[LinkServer, Endpoint, Host],
) -> None:
    """Between hosts the old link's reset can be lost: the shard must not
    wait to see it drop before it orders the sender's batches."""
    _, endpoint, host = shard
    host.hold.clear()
    old_reader, old = await _connect(endpoint)
    old.write(_batch(1))
    await _started(host, 1)
    reader, new = await _connect(endpoint)  # the old one is still open here
    new.write(_batch(2))
    assert await asyncio.wait_for(old_reader.read(), 10) == b""  # the shard closed it
    await asyncio.sleep(0.2)
    assert host.started == [[1]]
    host.hold.set()
    assert await _reply(reader) == [{"rid": 2, "v": 3}]
    assert host.finished == [[1], [2]]
    new.close()


async def test_another_senders_lost_batch_does_not_hold_this_one(
    shard: tuple[LinkServer, Endpoint, Host],
) -> None:
    _, endpoint, host = shard
    host.hold.clear()
    _, first = await _connect(endpoint, sender=b"gateway1")
    first.write(_batch(1))
    await _started(host, 1)
    first.transport.abort()
    _, second = await _connect(endpoint, sender=b"gateway2")
    second.write(_batch(2))
    await _started(host, 2)  # does not wait for gateway1's orphan
    host.hold.set()
    second.close()


async def test_gateways_starting_together_get_one_listener() -> None:
    host = Host()
    server = LinkServer(1, host.apply_batch)
    first, second = await asyncio.gather(server.start("127.0.0.1"), server.start("127.0.0.1"))
    assert first == second
    await server.close()
    with pytest.raises(OSError):
        await asyncio.open_connection(first.host, first.port)
