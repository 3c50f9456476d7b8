"""Cold user activation: the first request of a user who is not resident.

python -m bench.cold [--users 500] [--idle-seconds 2] [--out FILE]

Starts an actor-core server (like ``loadout bench``) that passivates users
idle for 2 s, creates ``--users`` users with a grant each, waits until they
have been passivated, then, one request at a time over one admin connection,
sends ``inspect`` for each user twice: the first finds the user only in
PostgreSQL (cold: activation), the second finds it resident (warm).  The
difference per user is what activation costs a request.  Requests go one at
a time, so each batch carries one user and nothing else.

``--idle-seconds 600`` is the control: nobody is passivated, both requests
find the user resident, and the difference should vanish.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection, connect

from bench.report import summary
from bench.server import BenchServer
from protocol.messages import Role
from server.auth import issue_token

__all__ = ["main"]


async def _request(ws: ClientConnection, message: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    await ws.send(msgspec.msgpack.encode(message))
    while True:
        frame = await asyncio.wait_for(ws.recv(), 30)
        assert isinstance(frame, bytes), "msgpack replies come in binary frames"
        reply: dict[str, Any] = msgspec.msgpack.decode(frame)
        if reply.get("rid") == message["rid"]:
            return (time.perf_counter() - started) * 1000, reply


async def _measure(url: str, secret: str, users: list[str], idle: float) -> dict[str, Any]:
    token = issue_token(secret, "bench-cold", Role.ADMIN, 3600)
    async with connect(
        url,
        additional_headers={"Authorization": f"Bearer {token}"},
        subprotocols=["loadout.v1.msgpack"],  # type: ignore[list-item]
        ping_interval=None,
    ) as ws:
        await ws.recv()  # welcome
        for i, user in enumerate(users):
            grant = {"type": "grant", "rid": i, "user": user, "amount": 100, "key": "cold"}
            _, reply = await _request(ws, grant)
            assert reply["type"] == "granted", reply
        # Passivation runs every min(10, idle / 2) s: three short idle periods
        # are plenty (the control run with a long one does not wait for it).
        await asyncio.sleep(min(idle * 3, 6.0))
        cold: list[float] = []
        warm: list[float] = []
        for i, user in enumerate(users):
            for into in (cold, warm):
                took, reply = await _request(ws, {"type": "inspect", "rid": i, "user": user})
                assert reply["type"] == "state", reply
                into.append(took)
    extra = [c - w for c, w in zip(cold, warm, strict=True)]
    return {
        "users": len(users),
        "idle_seconds": idle,
        "cold_ms": summary(cold),
        "warm_ms": summary(warm),
        "cold_minus_warm_ms": summary(extra),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cold", description=__doc__)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--idle-seconds", type=float, default=2.0, help="passivate after")
    parser.add_argument("--out", help="JSON result file")
    args = parser.parse_args()
    users = [f"cold{uuid.uuid4().hex[:10]}" for _ in range(args.users)]
    idle = args.idle_seconds
    with BenchServer("actors", {"LOADOUT_IDLE_SECONDS": str(idle)}) as server:
        result = asyncio.run(_measure(server.url, server.secret, users, idle))
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
