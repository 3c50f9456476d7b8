"""A first measurement: closed-loop purchases over WebSockets.

    python bench/quick.py --url ws://127.0.0.1:8765/v1/ws --secret-file .loadout/secret

N connections (one user each, pre-funded with an admin grant), each keeping
``--depth`` purchases of a stackable consumable in flight for ``--seconds``
after a short warm-up.  Prints purchases/s and p50/p99 latency.  The full
benchmark (``loadout bench``) is its own issue.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from pathlib import Path

import msgspec
from websockets.asyncio.client import connect

from protocol.messages import Role
from server.auth import issue_token

SKU, PRICE = "plat.booster.xp", 5


async def _user(
    url: str,
    secret: str,
    user: str,
    depth: int,
    stop_at: float,
    warm_until: float,
    latencies: list[float],
    errors: list[str],
) -> int:
    token = issue_token(secret, user, Role.PLAYER, 3600)
    done = 0
    async with connect(
        url,
        additional_headers={"Authorization": f"Bearer {token}"},
        subprotocols=["loadout.v1.msgpack"],
    ) as ws:  # type: ignore[list-item]
        await ws.recv()
        sent: dict[int, float] = {}
        n = 0

        async def send() -> None:
            nonlocal n
            n += 1
            sent[n] = time.perf_counter()
            await ws.send(
                msgspec.msgpack.encode(
                    {"type": "purchase", "rid": n, "key": f"q{n}", "sku": SKU, "price": PRICE}
                )
            )

        for _ in range(depth):
            await send()
        while sent:
            reply = msgspec.msgpack.decode(await ws.recv())
            rid = reply.get("rid")
            if rid is None:
                continue  # a push
            now = time.perf_counter()
            started = sent.pop(rid)
            if reply["type"] != "purchased":
                errors.append(reply.get("code", "?"))
            elif now >= warm_until:
                latencies.append(now - started)
                done += 1
            if now < stop_at:
                await send()
    return done


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="ws://127.0.0.1:8765/v1/ws")
    parser.add_argument("--secret-file", default=".loadout/secret")
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=2)
    args = parser.parse_args()
    secret = Path(args.secret_file).read_text().strip()  # noqa: ASYNC240 - once, at start
    users = [f"bench-{uuid.uuid4().hex[:8]}-{i}" for i in range(args.connections)]
    admin = issue_token(secret, "bench-admin", Role.ADMIN, 3600)
    async with connect(args.url, additional_headers={"Authorization": f"Bearer {admin}"}) as ws:
        await ws.recv()
        for i, user in enumerate(users):
            await ws.send(
                msgspec.json.encode(
                    {"type": "grant", "rid": i, "user": user, "amount": 10**12, "key": "fund"}
                ).decode()
            )
        for _ in users:
            await ws.recv()
    latencies: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    warm_until = start + args.warmup
    stop_at = warm_until + args.seconds
    counts = await asyncio.gather(
        *(
            _user(args.url, secret, u, args.depth, stop_at, warm_until, latencies, errors)
            for u in users
        )
    )
    elapsed = time.perf_counter() - warm_until
    latencies.sort()
    q = statistics.quantiles(latencies, n=100)
    print(f"connections={args.connections} depth={args.depth} seconds={elapsed:.1f}")
    print(
        f"purchases/s={sum(counts) / elapsed:.0f} ok={sum(counts)} errors={len(errors)} "
        f"p50={q[49] * 1e3:.1f}ms p99={q[98] * 1e3:.1f}ms max={latencies[-1] * 1e3:.1f}ms"
    )


if __name__ == "__main__":
    asyncio.run(main())
