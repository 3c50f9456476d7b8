"""Match servers watch players (PROTOCOL.md §11), over real sockets, with two
gateway processes sharing one set of shards: a watcher on one gateway
follows players connected to either, in version order, with no gap between
its snapshot and its first push."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from actors.routing import user_channel
from protocol.messages import Role
from tests.e2e.support import Client, ServerProcess, fund, new_user, two_gateways

#: LOADOUT_MAX_WATCH of both gateways: small, to reach it.
LIMIT = 4
WATCHED = ("inventory", "loadout")


@pytest.fixture(scope="module")
def gateways(
    ray_address: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, ServerProcess, str]]:
    """Two gateways sharing shards, PostgreSQL and Redis (and Redis's URL)."""
    root = tmp_path_factory.mktemp("watching")
    with two_gateways(root, ray_address, {"LOADOUT_MAX_WATCH": str(LIMIT)}) as (a, b, services):
        yield a, b, services["redis_url"]
    for proc in (a, b):
        assert "Traceback" not in proc.log_path.read_text(errors="replace")


def _replay(snapshot: dict[str, Any], pushes: list[dict[str, Any]]) -> dict[str, Any]:
    """A watcher's view of a user: its snapshot with the pushes applied."""
    inventory = {i["sku"]: i for i in snapshot["inventory"]}
    profiles = {p["profile"]: p for p in snapshot["profiles"]}
    balance = snapshot["balance"]
    for push in pushes:
        if push["type"] == "inventory":
            balance = push["balance"]
            for item in push["items"]:
                if item["quantity"]:
                    inventory[item["sku"]] = item
                else:
                    inventory.pop(item["sku"], None)
        else:
            profiles[push["profile"]] = {k: push[k] for k in ("profile", "game", "equipped")}
    return {"balance": balance, "inventory": inventory, "profiles": profiles}


def _view_of(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "balance": state["balance"],
        "inventory": {i["sku"]: i for i in state["inventory"]},
        "profiles": {p["profile"]: p for p in state["profiles"]},
    }


async def _pushes_until(
    watcher: Client, versions: dict[str, int], linger: float = 0.0, timeout: float = 20.0
) -> dict[str, list[dict[str, Any]]]:
    """The watcher's pushes by user, received until each user of ``versions``
    has reached that version, then for ``linger`` seconds more."""
    got: dict[str, list[dict[str, Any]]] = defaultdict(list)
    pending, watcher.pushes = [p for p in watcher.pushes if p["type"] in WATCHED], []
    deadline = time.monotonic() + timeout
    while True:
        for push in pending:
            got[push["user"]].append(push)
        pending = []
        if all(got[u] and got[u][-1]["version"] >= v for u, v in versions.items()):
            break
        message = await watcher.recv(max(0.01, deadline - time.monotonic()))
        if message.get("type") in WATCHED:
            pending.append(message)
    with contextlib.suppress(TimeoutError):
        while linger > 0:
            message = await watcher.recv(linger)
            if message.get("type") in WATCHED:
                got[message["user"]].append(message)
    return got


async def test_a_watcher_follows_players_on_both_gateways(
    gateways: tuple[ServerProcess, ServerProcess, str],
) -> None:
    a, b, _ = gateways
    alice, bob = new_user("alice"), new_user("bob")
    await fund(a, alice, 1000)
    await fund(b, bob, 1000)
    async with (
        await Client.open(a, alice) as on_a,
        await Client.open(b, bob, binary=True) as on_b,
        await Client.open(a, "match-1", role=Role.SERVICE) as watcher,
        await Client.open(b, "match-2", role=Role.SERVICE, binary=True) as loadouts_only,
        await Client.open(b, "ops", role=Role.ADMIN) as admin,
    ):
        # Changes in flight while the snapshots are taken: none may be missed.
        buy = {"type": "purchase", "sku": "plat.booster.xp", "price": 5}
        buys = [await on_a.send({**buy, "key": f"x{n}"}) for n in range(10)]
        watching = await watcher.request(
            {"type": "watch", "users": [alice, bob, alice], "inventory": True}
        )
        assert [p for p in watcher.pushes if p["type"] in WATCHED] == []  # the reply first
        other = await loadouts_only.request({"type": "watch", "users": [alice, bob]})
        for rid in buys:
            assert (await on_a.reply(rid))["type"] == "purchased"
        assert watching["type"] == "watching", watching
        snapshots = {s["user"]: s for s in watching["users"]}
        assert list(snapshots) == [alice, bob]
        assert set(snapshots[bob]) == {"user", "version", "profiles", "balance", "inventory"}
        assert other["type"] == "watching"
        assert set(other["users"][0]) == {"user", "version", "profiles"}

        for c, key in ((on_a, "f-a"), (on_b, "f-b")):
            buy = {"type": "purchase", "key": key, "sku": "plat.frame.gold", "price": 200}
            assert (await c.request(buy))["type"] == "purchased"
            equip = {"type": "equip", "profile": "main", "slot": "frame", "sku": "plat.frame.gold"}
            assert (await c.request(equip))["type"] == "equipped"
        unequip = {"type": "unequip", "profile": "main", "slot": "frame"}
        assert (await on_b.request(unequip))["type"] == "unequipped"
        grant = {"type": "grant", "user": bob, "amount": 7, "key": "g", "reason": "mvp"}
        assert (await admin.request(grant))["type"] == "granted"

        states = {alice: await on_a.request({"type": "state"})}
        states[bob] = await on_b.request({"type": "state"})
        finals = {user: state["version"] for user, state in states.items()}
        got = await _pushes_until(watcher, finals)
        for user, pushes in got.items():
            versions = [p["version"] for p in pushes]
            assert versions == sorted(versions), (user, versions)
            # Every change brings a push when inventory is watched: no gap.
            expected = list(range(snapshots[user]["version"] + 1, finals[user] + 1))
            assert sorted(set(versions)) == expected, (user, versions)
            assert _replay(snapshots[user], pushes) == _view_of(states[user])
        granted = got[bob][-1]  # the operator's grant
        assert (granted["type"], granted["balance"]) == ("inventory", states[bob]["balance"])

        last = {alice: finals[alice], bob: finals[bob] - 1}  # (bob's last change: the grant)
        loadouts = await _pushes_until(loadouts_only, last, linger=0.3)
        seen = [p for pushes in loadouts.values() for p in pushes]
        assert {p["type"] for p in seen} == {"loadout"}
        assert [p["equipped"] for p in loadouts[bob]] == [{"frame": "plat.frame.gold"}, {}]


async def test_players_may_not_watch(gateways: tuple[ServerProcess, ServerProcess, str]) -> None:
    a, _, _ = gateways
    async with await Client.open(a, new_user()) as player:
        for kind in ("watch", "unwatch"):
            reply = await player.request({"type": kind, "users": [new_user()]})
            assert reply["type"] == "error" and reply["code"] == "forbidden", reply


async def _subscribers(redis_url: str, user: str) -> int:
    redis = aioredis.from_url(redis_url)
    try:
        ((_, count),) = await redis.pubsub_numsub(user_channel(user))
        return int(count)
    finally:
        await redis.aclose()


async def _settles(redis_url: str, user: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while await _subscribers(redis_url, user) != count:
        assert time.monotonic() < deadline, f"{user}: not {count} subscribers"
        await asyncio.sleep(0.05)


async def test_limits_and_bad_requests_change_nothing(
    gateways: tuple[ServerProcess, ServerProcess, str],
) -> None:
    a, _, redis_url = gateways
    users = [new_user() for _ in range(LIMIT + 1)]
    async with await Client.open(a, "match-3", role=Role.SERVICE) as watcher:
        reply = await watcher.request({"type": "watch", "users": users[:LIMIT], "inventory": True})
        assert len(reply["users"]) == LIMIT
        # One already watched and one more: past the limit, refused whole.
        reply = await watcher.request({"type": "watch", "users": users[LIMIT - 1 :]})
        assert (reply["type"], reply["code"]) == ("error", "limit_exceeded"), reply
        for bad in ([], [new_user() for _ in range(501)], ["not a user id"]):
            reply = await watcher.request({"type": "watch", "users": bad})
            assert (reply["type"], reply["code"]) == ("error", "bad_request"), reply
        assert await _subscribers(redis_url, users[LIMIT]) == 0
        await fund(a, users[LIMIT], 5)  # not watched: no push
        await fund(a, users[0], 5)  # watched: its push comes, and it is the only one
        pushes = await _pushes_until(watcher, {users[0]: 1}, linger=0.5)
        assert [p["balance"] for p in pushes[users[0]]] == [5]
        assert users[LIMIT] not in pushes


async def test_unwatch_and_closing_end_watches(
    gateways: tuple[ServerProcess, ServerProcess, str],
) -> None:
    a, b, redis_url = gateways
    left, stays = new_user(), new_user()
    async with await Client.open(b, "match-4", role=Role.SERVICE) as watcher:
        reply = await watcher.request({"type": "watch", "users": [left, stays], "inventory": True})
        assert reply["type"] == "watching"
        await _settles(redis_url, left, 1)
        reply = await watcher.request({"type": "unwatch", "users": [left]})
        assert reply == {"type": "unwatched", "users": [left], "rid": reply["rid"]}
        await _settles(redis_url, left, 0)
        await fund(a, left, 5)
        await fund(a, stays, 5)  # the push after the one that must not come
        pushes = await _pushes_until(watcher, {stays: 1}, linger=0.5)
        assert len(pushes[stays]) == 1
        assert left not in pushes
        # Watching again takes a new snapshot: what changed meanwhile is in it.
        again = await watcher.request({"type": "watch", "users": [left], "inventory": True})
        assert again["users"][0]["balance"] == 5
    await _settles(redis_url, stays, 0)  # closing ended the watch
    await _settles(redis_url, left, 0)
