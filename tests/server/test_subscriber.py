"""server/subscriber.py against a real (embedded) Redis."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from server.subscriber import Subscriber


class Inbox:
    def __init__(self) -> None:
        self.got: list[tuple[bytes, bytes]] = []

    def __call__(self, channel: bytes, data: bytes) -> None:
        self.got.append((channel, data))

    async def count(self, n: int) -> None:
        for _ in range(500):
            if len(self.got) >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{len(self.got)} messages, wanted {n}: {self.got}")


async def test_messages_arrive_once_subscribed_and_stop_after_unsubscribe(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    inbox = Inbox()
    subscriber = Subscriber(client, inbox)
    await subscriber.start()
    try:
        await subscriber.subscribe("a", "b")
        big = bytes(range(256)) * 1000  # split across reads, with CR/LF inside
        assert await client.publish("a", b"one") == 1  # subscribed when subscribe() returned
        await client.publish("b", big)
        await client.publish("c", b"not subscribed")
        await inbox.count(2)
        await subscriber.unsubscribe("a")
        assert await client.publish("a", b"after") == 0
        await client.publish("b", b"two")
        await inbox.count(3)
        assert inbox.got == [(b"a", b"one"), (b"b", big), (b"b", b"two")]
    finally:
        await subscriber.close()
        await client.aclose()


async def test_it_reconnects_and_subscribes_again(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    inbox = Inbox()
    subscriber = Subscriber(client, inbox)
    await subscriber.start()
    try:
        await subscriber.subscribe("a")
        assert await client.client_kill_filter(_type="pubsub") == 1
        for _ in range(500):  # back, and subscribed to "a" again
            if await client.publish("a", b"again") == 1:
                break
            await asyncio.sleep(0.01)
        await inbox.count(1)
        assert inbox.got[0] == (b"a", b"again")
    finally:
        await subscriber.close()
        await client.aclose()


async def test_it_authenticates_when_the_url_has_a_password(redis_url: str) -> None:
    admin = aioredis.Redis.from_url(redis_url)
    await admin.config_set("requirepass", "s3cret")
    client = aioredis.Redis.from_url(redis_url, password="s3cret")
    inbox = Inbox()
    subscriber = Subscriber(client, inbox)
    await subscriber.start()
    try:
        await subscriber.subscribe("a")
        await client.publish("a", b"hello")
        await inbox.count(1)
        assert inbox.got == [(b"a", b"hello")]
    finally:
        await subscriber.close()
        await client.aclose()
        await admin.aclose()
