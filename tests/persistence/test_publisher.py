"""persistence.publisher against a real (embedded) Redis."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from persistence.publisher import PushPublisher
from persistence.resp import connect


async def test_publish_hands_the_pushes_to_redis_before_it_returns(redis_url: str) -> None:
    """The shard answers right after ``publish`` returns: a PUBLISH sent
    afterwards (the marker, standing in for anything that follows the
    answer) reaches subscribers after the pushes, never before them."""
    client = aioredis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    publisher = PushPublisher(client)
    await publisher.start()
    try:
        await pubsub.subscribe("c")
        assert (await pubsub.get_message(timeout=2.0))["type"] == "subscribe"  # type: ignore[index]
        marker = await connect(client, None, lambda connection: None)
        for _ in range(20):
            publisher.publish([("c", b"push-1"), ("c", b"push-2")])
            marker.send(b"PUBLISH", b"c", b"marker")  # written right after, no await between
            got = [(await pubsub.get_message(timeout=2.0))["data"] for _ in range(3)]  # type: ignore[index]
            assert got == [b"push-1", b"push-2", b"marker"]
        assert publisher.publish([]).done()  # nothing to publish: nothing to wait for
        await asyncio.wait_for(publisher.publish([("c", b"push-3")]), 5)
        assert publisher.dropped == 0
        marker.close()
    finally:
        await publisher.close()
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()
