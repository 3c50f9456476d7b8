"""server/watching.py without sockets: the race between a snapshot and the
pushes that arrive while it is taken, the limit, and what a failed or ended
watch leaves behind (PROTOCOL.md §11).  The shards and Redis are fakes whose
timing the tests set; tests/e2e/test_watching.py runs the real thing."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import msgspec
import pytest

from actors.shard.records import ShardRequest, error_reply
from protocol.codec import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL, codec_for
from protocol.errors import ErrorCode
from protocol.messages import (
    InventoryEntry,
    InventoryPush,
    LoadoutPush,
    ProfileView,
    StateReply,
    Unwatch,
    Watch,
)
from server.batching import Answer
from server.metrics import Metrics
from server.watching import Watcher, Watches


class Shards:
    """Holds each request's answer until the test gives it."""

    def __init__(self) -> None:
        self.waiting: dict[str, list[Answer]] = {}

    def submit(self, user_id: str, request: ShardRequest, reply: Answer) -> None:
        self.waiting.setdefault(user_id, []).append(reply)

    async def drain(self) -> None: ...

    async def close(self) -> None: ...

    def answer(self, user: str, version: int) -> None:
        state = StateReply(
            user=user, version=version, balance=version * 10,
            inventory=[InventoryEntry("plat.frame.gold", 1)],
            profiles=[ProfileView("main", None, {})],
        )  # fmt: skip
        for reply in self.waiting.pop(user):
            reply(msgspec.msgpack.encode(state))

    def fail(self, user: str) -> None:
        for reply in self.waiting.pop(user):
            reply(error_reply(None, ErrorCode.UNAVAILABLE, "retry"))


class Redis:
    """Subscriptions that confirm at once, counted per user."""

    def __init__(self) -> None:
        self.users: Counter[str] = Counter()

    def subscribe(self, user_id: str) -> asyncio.Future[None]:
        self.users[user_id] += 1
        ready = asyncio.get_running_loop().create_future()
        ready.set_result(None)
        return ready

    def unwatch(self, user_id: str) -> None:
        self.users[user_id] -= 1
        if not self.users[user_id]:
            del self.users[user_id]


class Connection:
    def __init__(self, binary: bool = False) -> None:
        self.codec = codec_for(MSGPACK_SUBPROTOCOL if binary else JSON_SUBPROTOCOL)
        self.out: list[tuple[str, dict[str, Any]]] = []
        self.watcher = Watcher(self.codec, self._push, self._reply)

    def _push(self, data: bytes) -> None:
        self.out.append(("push", self.codec.decode_any(data)))

    def _reply(self, data: bytes) -> None:
        self.out.append(("reply", self.codec.decode_any(data)))


def loadout(version: int) -> bytes:
    return msgspec.msgpack.encode(LoadoutPush(version, "main", None, {"frame": f"f{version}"}))


def inventory(version: int) -> bytes:
    return msgspec.msgpack.encode(InventoryPush(version, version * 10, []))


@pytest.fixture
def setup() -> tuple[Watches, Shards, Redis]:
    shards, redis = Shards(), Redis()
    watches = Watches(shards, limit=3, metrics=Metrics())
    watches.subscriptions = redis
    return watches, shards, redis


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.parametrize("binary", [False, True])
async def test_pushes_during_the_snapshot_follow_it_and_older_ones_are_dropped(
    setup: tuple[Watches, Shards, Redis], binary: bool
) -> None:
    watches, shards, redis = setup
    conn = Connection(binary)
    watches.watch(conn.watcher, Watch(rid=1, users=["alice"], inventory=True))
    await settle()
    assert redis.users == {"alice": 1} and "alice" in shards.waiting  # subscribed first
    watches.deliver("alice", loadout(4))  # in the snapshot
    watches.deliver("alice", inventory(5))  # after it
    watches.deliver("alice", loadout(5))
    assert conn.out == []  # nothing before the reply
    shards.answer("alice", 4)
    await settle()
    watches.deliver("alice", inventory(6))
    kinds = [(what, m["type"], m.get("version")) for what, m in conn.out]
    assert kinds == [
        ("reply", "watching", None),
        ("push", "inventory", 5),
        ("push", "loadout", 5),
        ("push", "inventory", 6),
    ]
    snapshot = conn.out[0][1]["users"][0]
    assert (snapshot["version"], snapshot["balance"]) == (4, 40)
    assert {m["user"] for what, m in conn.out if what == "push"} == {"alice"}


async def test_loadouts_only_unless_inventory_is_asked(
    setup: tuple[Watches, Shards, Redis],
) -> None:
    watches, shards, _ = setup
    conn = Connection()
    watches.watch(conn.watcher, Watch(rid=1, users=["bob"]))
    await settle()
    shards.answer("bob", 1)
    await settle()
    watches.deliver("bob", inventory(2))
    watches.deliver("bob", loadout(3))
    assert [m["type"] for _, m in conn.out] == ["watching", "loadout"]
    assert set(conn.out[0][1]["users"][0]) == {"user", "version", "profiles"}


async def test_past_the_limit_nothing_changes(setup: tuple[Watches, Shards, Redis]) -> None:
    watches, shards, redis = setup
    conn = Connection()
    watches.watch(conn.watcher, Watch(rid=1, users=["a", "b", "a"]))
    await settle()
    shards.answer("a", 0)
    shards.answer("b", 0)
    await settle()
    watches.watch(conn.watcher, Watch(rid=2, users=["b", "c", "d"]))
    await settle()
    assert conn.out[-1][1]["code"] == ErrorCode.LIMIT_EXCEEDED
    assert shards.waiting == {} and redis.users == {"a": 1, "b": 1}
    assert set(conn.watcher.users) == {"a", "b"}


async def test_a_failed_snapshot_changes_nothing(setup: tuple[Watches, Shards, Redis]) -> None:
    watches, shards, redis = setup
    conn = Connection()
    watches.watch(conn.watcher, Watch(rid=1, users=["a"]))
    await settle()
    shards.answer("a", 1)
    await settle()
    watches.watch(conn.watcher, Watch(rid=2, users=["a", "b"]))
    await settle()
    watches.deliver("a", loadout(2))  # waits for the new snapshot...
    shards.fail("a")
    shards.fail("b")
    await settle()
    assert [m["type"] for _, m in conn.out] == ["watching", "error", "loadout"]  # ...then comes
    assert conn.out[1][1]["code"] == ErrorCode.UNAVAILABLE
    assert redis.users == {"a": 1} and set(conn.watcher.users) == {"a"}


async def test_unwatch_and_closing_release_the_subscriptions(
    setup: tuple[Watches, Shards, Redis],
) -> None:
    watches, shards, redis = setup
    conn, other = Connection(), Connection()
    watches.watch(conn.watcher, Watch(rid=1, users=["a", "b"]))
    watches.watch(other.watcher, Watch(rid=1, users=["a"]))
    await settle()
    assert redis.users == {"a": 2, "b": 1}
    shards.answer("a", 0)
    shards.answer("b", 0)
    await settle()
    watches.unwatch(conn.watcher, Unwatch(rid=2, users=["a", "x"]))
    assert conn.out[-1][1] == {"type": "unwatched", "users": ["a", "x"], "rid": 2}
    watches.deliver("a", loadout(1))
    assert [m["type"] for _, m in conn.out] == ["watching", "unwatched"]
    assert redis.users == {"a": 1, "b": 1}
    watches.end(conn.watcher)
    assert redis.users == {"a": 1}
    watches.end(other.watcher)
    assert redis.users == {}
