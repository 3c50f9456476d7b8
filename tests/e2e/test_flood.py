"""One user flooding the server (PROTOCOL.md §5, ``rate_limited``; issue 13).

The shared server runs with the default limits (100 requests/s per user,
bursts of 200).  One user pipelines far more than that; it is refused with
``rate_limited`` and a ``retry_after_ms``, every one of its requests still
gets exactly one reply, and other users are answered meanwhile.  How much the
flood slows the others is measured by ``python -m bench.flood``
(BENCHMARKS.md), not asserted here.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import msgspec

from tests.e2e.support import Client, ServerProcess, new_user

FLOOD = 1000  # requests sent at once: 5 times the burst


async def test_a_flooding_user_is_rate_limited_while_others_are_served(
    server: ServerProcess,
) -> None:
    flooder = await Client.open(server, new_user("flood"), binary=True)
    others = [await Client.open(server, new_user()) for _ in range(5)]
    for i in range(FLOOD):  # pipelined: no reply is awaited
        await flooder.send_raw(msgspec.msgpack.encode({"type": "state", "rid": i}))
    # While the flood is being refused, everyone else is served, several times over.
    for _ in range(3):
        replies = await asyncio.gather(*(c.request({"type": "state"}) for c in others))
        assert [r["type"] for r in replies] == ["state"] * len(others), replies
    outcomes: Counter[str] = Counter()
    rids: Counter[int] = Counter()
    for _ in range(FLOOD):
        reply = await flooder.recv()
        rids[reply["rid"]] += 1
        if reply["type"] == "error":
            assert reply["code"] == "rate_limited", reply
            assert reply["retry_after_ms"] >= 1, reply
        outcomes[reply["type"] if reply["type"] != "error" else reply["code"]] += 1
    assert rids == Counter(range(FLOOD))  # exactly one reply per request
    assert set(outcomes) == {"state", "rate_limited"}, outcomes
    # Once the bucket refills, the flooder is served again.
    await asyncio.sleep(1.0)
    assert (await flooder.request({"type": "state"}))["type"] == "state"
    for c in [flooder, *others]:
        await c.close()
