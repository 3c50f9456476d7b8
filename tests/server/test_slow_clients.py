"""Slow, silent and greedy clients against a real gateway on a free port
(issue 13): the handshake timeout, the idle timeout, the limit per client
address, the bad-frame limit as a setting, and the open-file limit.

The backend is test_gateway's ``HeldBackend``: these tests are about what the
gateway lets in and keeps open, not about what the shards answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from actors.catalog import Catalog, demo_catalog_text, parse_catalog
from protocol.codec import JSON_SUBPROTOCOL
from server.admission import address_key, raise_fd_limit
from server.auth import issue_token
from server.gateway import Gateway, GatewayLimits
from server.ratelimit import RateLimiter
from tests.server.test_gateway import (
    SECRET,
    HeldBackend,
    _client_frame,
    _raw_frame,
    _raw_open,
    _raw_until_close,
    _wait_for,
    serving,
)

REPO = Path(__file__).resolve().parents[2]
SLOWLORIS = 1000


@contextlib.asynccontextmanager
async def _serving(
    limits: GatewayLimits, max_connections: int = 20_000
) -> AsyncIterator[tuple[Gateway, HeldBackend]]:
    backend = HeldBackend()
    async with serving(backend, limits, max_connections) as gateway:
        yield gateway, backend


async def _open(gateway: Gateway, user: str, source: str = "127.0.0.1") -> ClientConnection:
    """A JSON connection from ``source`` (any 127/8 address is this host), welcomed.

    The client sends no pings of its own: only the server's pings and the
    client library's automatic pongs keep it alive."""
    ws = await connect(
        f"ws://127.0.0.1:{gateway.port}/v1/ws",
        additional_headers={"Authorization": f"Bearer {issue_token(SECRET, user)}"},
        subprotocols=[JSON_SUBPROTOCOL],  # type: ignore[list-item]
        local_addr=(source, 0),
        ping_interval=None,
    )
    assert msgspec.json.decode(await ws.recv())["type"] == "welcome"
    return ws


async def _state(ws: ClientConnection, backend: HeldBackend, rid: int) -> dict[str, object]:
    await ws.send(msgspec.json.encode({"type": "state", "rid": rid}).decode())
    await _wait_for(lambda: any(r.rid == rid for _, r, _ in backend.submitted))
    backend.release()
    reply: dict[str, object] = msgspec.json.decode(await asyncio.wait_for(ws.recv(), 10))
    return reply


# ------------------------------------------------------------- handshakes


async def _slowloris_socket(
    port: int,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v1/ws HTTP/1.1\r\nHost: loadout\r\nX-Slow: ")
    return reader, writer


async def _trickle(sockets: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    """One more byte of a header that never ends, on every socket, 10 times a second."""
    while True:
        for reader, writer in sockets:
            if not reader.at_eof() and not writer.is_closing():
                writer.write(b"z")
        await asyncio.sleep(0.1)


async def _closed_by_server(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(ConnectionError):
        while await reader.read(4096):
            pass


async def test_a_slowloris_of_1000_sockets_keeps_nobody_out() -> None:
    """1,000 sockets trickle an HTTP request that never ends; another client
    still connects and is served, and the handshake timeout closes them all.

    The gateway admits 5 connections: sockets still in their handshake must
    not take a place, or the honest client would be refused."""
    raise_fd_limit(2 * SLOWLORIS + 1024)  # both ends of every socket are in this process
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 2 * SLOWLORIS + 256:
        pytest.skip(f"needs {2 * SLOWLORIS + 256} open files, the hard limit allows {soft}")
    async with _serving(GatewayLimits(handshake_timeout=2.0), max_connections=5) as (gw, backend):
        sockets = []
        for _ in range(SLOWLORIS // 100):  # in steps, within the listen backlog
            sockets += await asyncio.gather(*(_slowloris_socket(gw.port) for _ in range(100)))
        trickling = asyncio.get_running_loop().create_task(_trickle(sockets))
        try:
            await asyncio.sleep(0.3)
            ws = await _open(gw, "honest")
            assert (await _state(ws, backend, 1))["rid"] == 1
            assert gw.connections == 1
            await asyncio.wait_for(
                asyncio.gather(*(_closed_by_server(reader) for reader, _ in sockets)), 30
            )
            # The honest client, no slower to handshake, is still served.
            assert (await _state(ws, backend, 2))["rid"] == 2
            await ws.close()
        finally:
            trickling.cancel()
            for _, writer in sockets:
                writer.transport.abort()


async def test_connections_per_address_are_limited_with_429() -> None:
    async with _serving(GatewayLimits(per_address=3)) as (gw, backend):
        first = [await _open(gw, f"a{i}") for i in range(3)]
        with pytest.raises(InvalidStatus) as refused:
            await _open(gw, "a3")
        assert refused.value.response.status_code == 429
        elsewhere = await _open(gw, "b", source="127.0.0.2")  # another address has room
        assert gw.per_address == {"127.0.0.1": 3, "127.0.0.2": 1}
        await first[0].close()
        await _wait_for(lambda: gw.per_address.get("127.0.0.1") == 2)
        again = await _open(gw, "a4")
        assert (await _state(again, backend, 7))["rid"] == 7
        metrics = gw.metrics.render().decode()
        assert 'loadout_refused_handshakes_total{limit="per_address"} 1.0' in metrics
        for ws in [*first[1:], elsewhere, again]:
            await ws.close()
        await _wait_for(lambda: gw.per_address == {} and gw.connections == 0)


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        (("203.0.113.9", 4000), "203.0.113.9"),
        (("2001:db8:1:2:aaaa::1", 4000, 0, 0), "2001:db8:1:2::/64"),
        (("2001:db8:1:2:bbbb::9", 4001, 0, 0), "2001:db8:1:2::/64"),
        (("2001:db8:1:3::1", 4000, 0, 0), "2001:db8:1:3::/64"),
        (("::ffff:198.51.100.7", 4000, 0, 0), "198.51.100.7"),
        (("fe80::1%eth0", 4000, 0, 2), "fe80::/64"),
        ("/run/loadout.sock", ""),
        (None, ""),
    ],
)
def test_address_keys(peer: object, key: str) -> None:
    """An IPv6 host holds a whole /64: counting single addresses would let it
    take a new one for every connection."""
    assert address_key(peer) == key


# ------------------------------------------------------------------ idle

IDLE = GatewayLimits(ping_interval=0.3, idle_timeout=1.0, close_timeout=0.5)


def _idle_closes(gateway: Gateway) -> float:
    value = gateway.metrics.registry.get_sample_value(
        "loadout_disconnects_total", {"reason": "idle"}
    )
    return value or 0.0


async def test_a_quiet_client_that_answers_pings_stays_connected() -> None:
    async with _serving(IDLE) as (gw, backend):
        ws = await _open(gw, "quiet")
        await asyncio.sleep(4 * IDLE.idle_timeout)  # it sends nothing but pongs
        assert (await _state(ws, backend, 1))["rid"] == 1
        assert _idle_closes(gw) == 0
        await ws.close()


async def test_a_client_that_trickles_a_frame_is_closed_as_idle() -> None:
    """Bytes keep arriving, so picows never pings; but no frame ever completes."""
    async with _serving(IDLE) as (gw, _):
        reader, writer = await _raw_open(gw, "trickle")
        assert (await _raw_frame(reader))[0] == 0x1  # the welcome
        frame = _client_frame(0x1, b'{"type":"state","rid":1,"pad":"' + b"x" * 200 + b'"}')

        async def trickle() -> None:
            for i in range(len(frame)):
                writer.write(frame[i : i + 1])
                await asyncio.sleep(0.05)

        trickling = asyncio.get_running_loop().create_task(trickle())
        try:
            _, code = await _raw_until_close(reader)
        finally:
            trickling.cancel()
        assert code == 1001
        await _wait_for(lambda: gw.connections == 0)
        assert _idle_closes(gw) == 1
        writer.transport.abort()


async def test_a_peer_that_never_answers_pings_is_closed() -> None:
    """A half-open connection: the peer is gone and nothing comes back."""
    async with _serving(IDLE) as (gw, _):
        reader, writer = await _raw_open(gw, "gone")
        assert (await _raw_frame(reader))[0] == 0x1
        seen, _ = await _raw_until_close(reader)  # read, but never answer
        assert 0x9 in seen  # it was pinged first
        await _wait_for(lambda: gw.connections == 0)
        writer.transport.abort()


def test_the_idle_timeout_must_outlast_the_ping_interval() -> None:
    with pytest.raises(ValueError, match="idle_timeout"):
        GatewayLimits(ping_interval=20.0, idle_timeout=20.0)


# ------------------------------------------------------------- bad frames


async def test_the_bad_frame_limit_is_a_setting() -> None:
    async with _serving(GatewayLimits(bad_frames=30)) as (gw, backend):
        ws = await _open(gw, "clumsy")
        for _ in range(30):
            await ws.send("nope")
            reply = msgspec.json.decode(await asyncio.wait_for(ws.recv(), 10))
            assert reply["code"] == "bad_request"
        assert (await _state(ws, backend, 1))["rid"] == 1  # 30 in a minute: still open
        await ws.send("nope")
        assert msgspec.json.decode(await asyncio.wait_for(ws.recv(), 10))["code"] == "bad_request"
        await asyncio.wait_for(ws.wait_closed(), 10)
        assert ws.close_code == 1008


# ------------------------------------------------------------ rate limit


async def test_a_rate_limited_client_is_not_read_until_its_wait_is_over() -> None:
    """Refusing costs about what serving costs: a client that sends on while
    refused waits in TCP, or it would take the event loop from everyone."""
    backend = HeldBackend()
    catalog = Catalog.from_document(1, parse_catalog(demo_catalog_text()))
    limiter = RateLimiter(rate=2, burst=2)  # a refusal waits 500 ms
    gw = Gateway(SECRET, backend, lambda: catalog, limiter, limits=GatewayLimits())
    await gw.start("127.0.0.1", 0)
    try:
        ws = await _open(gw, "greedy")
        for rid in range(10):  # pipelined
            await ws.send(msgspec.json.encode({"type": "state", "rid": rid}).decode())
        refusal = msgspec.json.decode(await asyncio.wait_for(ws.recv(), 10))
        assert (refusal["rid"], refusal["code"]) == (2, "rate_limited")
        assert refusal["retry_after_ms"] > 200
        await asyncio.sleep(0.2)
        (client,) = gw.clients["greedy"]
        assert client.throttled and client.reading_paused
        assert [r.rid for _, r, _ in backend.submitted] == [0, 1]  # nothing after the refusal
        replies = {2: refusal}
        while len(replies) < 10:  # once the wait is over, the rest, each answered once
            backend.release()
            with contextlib.suppress(TimeoutError):
                reply = msgspec.json.decode(await asyncio.wait_for(ws.recv(), 0.5))
                assert reply["rid"] not in replies
                replies[reply["rid"]] = reply
        backend.release()
        assert len(backend.submitted) > 2  # served again after waiting
        await ws.close()
    finally:
        await gw.stop_accepting()
        await gw.close_all()


# ------------------------------------------------------------- open files


def test_the_open_file_limit_is_raised_up_to_the_hard_limit() -> None:
    script = (
        "import logging, resource\n"
        "logging.basicConfig(level='INFO', format='%(levelname)s %(message)s')\n"
        "from server.admission import raise_fd_limit\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 512))\n"
        "print(raise_fd_limit(100))\n"  # enough already: unchanged
        "print(raise_fd_limit(400))\n"
        "print(raise_fd_limit(5000))\n"  # past the hard limit: as far as it goes
        "print(resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 512:
        pytest.skip("the hard open-file limit is below 512")
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:4] == ["(256, 256)", "(256, 400)", "(400, 512)", "(512, 512)"]
    assert "raised the open-file limit from 256 to 400" in done.stderr
    assert "short of the 5000" in done.stderr


def test_a_gateway_admits_no_more_connections_than_the_open_file_limit_allows() -> None:
    """With a hard limit of 1,536 open files, LOADOUT_MAX_CONNECTIONS of
    20,000 cannot be met: the gateway admits what the limit leaves room for
    (refusing the rest with 503) rather than failing ``accept`` with EMFILE."""
    script = (
        "import logging, resource\n"
        "logging.basicConfig(level='INFO', format='%(levelname)s %(message)s')\n"
        "from server.admission import FD_HEADROOM, connection_limit\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 1536))\n"
        "print(connection_limit(100), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
        "print(connection_limit(20000), 1536 - FD_HEADROOM)\n"
    )
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1536:
        pytest.skip("the hard open-file limit is below 1536")
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    enough, short = done.stdout.split("\n")[:2]
    assert enough == "100 1124"  # 100 + FD_HEADROOM: raised, and all admitted
    assert short == "512 512"
    assert "admitting at most 512 connections, not the 20000" in done.stderr
