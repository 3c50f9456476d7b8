"""persistence.publisher against a real (embedded) Redis."""

from __future__ import annotations

import redis.asyncio as aioredis

from persistence.publisher import PushPublisher


async def test_publish_and_wait_returns_once_redis_has_the_pushes(redis_url: str) -> None:
    """The shard answers after this returns: a PUBLISH sent afterwards (the
    marker, standing in for anything that follows the answer) reaches
    subscribers after the pushes, never before them."""
    client = aioredis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    publisher = PushPublisher(client)
    publisher.start()
    try:
        await pubsub.subscribe("c")
        assert (await pubsub.get_message(timeout=2.0))["type"] == "subscribe"  # type: ignore[index]
        for _ in range(20):
            await publisher.publish_and_wait([("c", b"push-1"), ("c", b"push-2")])
            await client.publish("c", b"marker")
            got = [(await pubsub.get_message(timeout=2.0))["data"] for _ in range(3)]  # type: ignore[index]
            assert got == [b"push-1", b"push-2", b"marker"]
        assert publisher.publish([]).done()  # nothing to publish: nothing to wait for
    finally:
        await publisher.close()
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()
