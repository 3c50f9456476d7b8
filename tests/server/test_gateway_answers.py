"""What the gateway tells a refused handshake, and what ``/metrics`` counts.

The shards are replaced by a backend that answers with a reply given by the
test (server.gateway's ``_route`` counts the outcome of the shard's reply).
"""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator

import jwt
import msgspec
import pytest
from websockets.asyncio.client import connect

from actors.shard.records import ShardRequest
from protocol.messages import Role
from server.auth import issue_token
from server.batching import Answer
from server.gateway import Gateway
from tests.server.test_gateway import serving

SECRET = "gateway-answers-secret-" * 3


class ScriptedBackend:
    """Answers every request at once with ``reply`` (its ``rid`` filled in)."""

    def __init__(self) -> None:
        self.reply: dict[str, object] = {"type": "test"}

    def submit(self, user_id: str, request: ShardRequest, reply: Answer) -> None:
        reply(msgspec.msgpack.encode({**self.reply, "rid": request.rid}))

    async def drain(self) -> None:
        pass

    async def close(self) -> None:
        pass


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[Gateway, ScriptedBackend]]:
    backend = ScriptedBackend()
    async with serving(backend, secret=SECRET) as gateway:
        yield gateway, backend


def _handshake(port: int, token: str | None) -> tuple[int, str]:
    """Status and body of a WebSocket upgrade request with ``token``."""
    url = f"http://127.0.0.1:{port}/v1/ws" + (f"?token={token}" if token is not None else "")
    request = urllib.request.Request(
        url,
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_a_refused_handshake_says_what_is_wrong_with_the_token(
    gateway: tuple[Gateway, ScriptedBackend],
) -> None:
    port = gateway[0].port
    expired = jwt.encode({"sub": "alice", "exp": int(time.time()) - 5}, SECRET)
    forged = issue_token("another-secret-" * 4, "alice")
    unknown_role = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60, "role": "x"}, SECRET)
    cases = {
        None: "unauthorized: token missing",
        "": "unauthorized: token missing",
        "garbage": "unauthorized: token malformed",
        expired: "unauthorized: token expired",
        forged: "unauthorized: token signature invalid",
        unknown_role: "unauthorized: token role unknown",
    }
    for token, body in cases.items():
        status, text = await asyncio.to_thread(_handshake, port, token)
        assert (status, text.strip()) == (401, body), token
        assert "another-secret" not in text and SECRET not in text


async def test_metrics_count_outcomes_from_a_closed_set(
    gateway: tuple[Gateway, ScriptedBackend],
) -> None:
    server, backend = gateway
    token = issue_token(SECRET, "alice", Role.PLAYER)
    url = f"ws://127.0.0.1:{server.port}/v1/ws?token={token}"
    replies = [
        {"type": "redeemed", "code": "WELCOME-2026", "gems": 5, "items": [], "balance": 5},
        {"type": "error", "code": "unknown_code", "message": "no such code"},
        {"type": "error", "code": "made-up-by-a-bug", "message": "?"},
    ]
    async with connect(url) as ws:
        await ws.recv()  # welcome
        for rid, reply in enumerate(replies):
            backend.reply = reply
            request = {"type": "redeem", "rid": rid, "key": f"k{rid}", "code": "WELCOME-2026"}
            await ws.send(msgspec.json.encode(request).decode())
            await ws.recv()
    metrics = server.metrics.render().decode()
    counted = {
        line.split('outcome="')[1].split('"')[0]
        for line in metrics.splitlines()
        if line.startswith("loadout_requests_total{") and 'type="redeem"' in line
    }
    assert counted == {"ok", "unknown_code", "other"}
    assert "WELCOME-2026" not in metrics
