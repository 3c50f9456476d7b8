"""Durability: what was acknowledged survives kill -9, and nothing is
half-applied; a left-over writer from the killed run is fenced out."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import msgspec
import ray
from websockets.exceptions import ConnectionClosed

from actors.routing import shard_name
from actors.shard.link import Endpoint, decode_replies, encode_batch, frame
from actors.shard.records import MOVED, BatchItem
from protocol.messages import Purchase, Role
from tests.e2e.support import Client, ServerProcess, first_shard_of, new_user


async def _snapshot(server: ServerProcess, users: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with await Client.open(server, "ops", role=Role.ADMIN) as admin:
        for user in users:
            state = await admin.request({"type": "inspect", "user": user})
            state.pop("rid")
            out[user] = state
    for user in users:
        async with await Client.open(server, user) as c:
            history = await c.request({"type": "history", "limit": 200})
            out[user]["history"] = history["entries"]
    return out


async def test_acknowledged_changes_survive_sigkill(fresh_server: ServerProcess) -> None:
    server = fresh_server.start()
    users = [new_user("d") for _ in range(6)]
    acked: dict[str, list[dict[str, Any]]] = {u: [] for u in users}
    async with await Client.open(server, "ops", role=Role.ADMIN) as admin:
        for u in users:
            assert (
                await admin.request({"type": "grant", "user": u, "amount": 500, "key": "seed"})
            )["type"] == "granted"
    clients = [await Client.open(server, u) for u in users]
    for round_ in range(3):
        pending = []
        for c, u in zip(clients, users, strict=True):
            pending.append((c, u, await c.send({"type": "purchase", "key": f"r{round_}",
                                                "sku": "plat.booster.xp", "price": 5,
                                                "quantity": round_ + 1})))  # fmt: skip
            if round_ == 0:
                pending.append((c, u, await c.send({"type": "create_profile", "profile": "kart",
                                                    "game": "kart"})))  # fmt: skip
        for c, u, rid in pending:
            reply = await c.reply(rid)
            assert reply["type"] in ("purchased", "profile_created"), reply
            acked[u].append(reply)
    # Acknowledged: now crash at once, without closing anything.
    server.kill()
    for c in clients:
        c.ws.transport.abort()
    old_namespace = server.namespace

    server.start()  # same data dir, new port, fresh shard actors
    after = await _snapshot(server, users)
    for u in users:
        state = after[u]
        assert state["balance"] == 500 - 5 * (1 + 2 + 3)
        assert state["version"] == 1 + 4  # grant, 3 purchases, 1 profile
        assert state["inventory"] == [{"sku": "plat.booster.xp", "quantity": 6, "expires_at": None}]
        assert [p["profile"] for p in state["profiles"]] == ["main", "kart"]
        ledger = state["history"]
        assert [e["kind"] for e in ledger] == ["purchase"] * 3 + ["grant"]
        assert sum(e["amount"] for e in ledger) == state["balance"]
        assert ledger[0]["balance"] == state["balance"]
        purchased = [r for r in acked[u] if r["type"] == "purchased"]
        assert max(r["version"] for r in acked[u]) == state["version"]
        assert {r["balance"] for r in purchased} <= {e["balance"] for e in ledger}

    # Keys survive the restart: a retry gets the original reply and changes nothing.
    async with await Client.open(server, users[0]) as c:
        replay = await c.request({"type": "purchase", "key": "r2", "sku": "plat.booster.xp",
                                  "price": 5, "quantity": 3})  # fmt: skip
        original = next(r for r in acked[users[0]] if r.get("total") == 15)
        assert {**replay, "rid": 0} == {**original, "rid": 0}
        conflict = await c.request({"type": "purchase", "key": "r2", "sku": "plat.booster.xp",
                                    "price": 5, "quantity": 1})  # fmt: skip
        assert conflict["code"] == "idempotency_conflict"

    # The killed run's shard actors are still alive in Ray; they must not write.
    # A fenced one answers unavailable, or closes its link and retires.
    for shard in range(server.shards):
        stale = ray.get_actor(shard_name(shard), namespace=old_namespace)
        replies = await _apply_over_link(
            await stale.endpoint.remote(),
            10**9,  # make it reload the catalog, then try to buy
            [(u, Purchase(rid=1, key="stale", sku="plat.booster.xp", price=5)) for u in users],
        )
        for reply in replies:  # MOVED: a user of another shard's partitions
            assert reply == MOVED or msgspec.msgpack.decode(reply)["code"] == "unavailable"
    assert await _snapshot(server, users) == after
    server.stop()


async def _apply_over_link(
    endpoint: Endpoint, catalog_version: int, items: list[BatchItem]
) -> list[bytes]:
    """Send one batch to a shard the way a gateway does (actors/shard/link.py)."""
    reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    try:
        writer.write(frame(endpoint.token + b"e2e-test") + encode_batch(catalog_version, items))
        try:
            size = int.from_bytes(await asyncio.wait_for(reader.readexactly(4), 30), "big")
            return decode_replies(await asyncio.wait_for(reader.readexactly(size), 30))
        except (asyncio.IncompleteReadError, ConnectionError):
            return []  # the shard closed its link without answering
    finally:
        writer.close()


async def test_graceful_stop_keeps_everything(fresh_server: ServerProcess) -> None:
    server = fresh_server.start()
    user = new_user()
    async with await Client.open(server, "ops", role=Role.ADMIN) as admin:
        await admin.request({"type": "grant", "user": user, "amount": 50, "key": "g"})
    c = await Client.open(server, user)
    rids = [
        await c.send({"type": "purchase", "key": f"k{i}", "sku": "plat.booster.xp", "price": 5})
        for i in range(10)
    ]
    first = await c.reply(rids[0])
    assert server.stop() == 0  # SIGTERM while requests are in flight: drain, exit 0
    answered = [first]
    for rid in rids[1:]:
        try:
            answered.append(await c.reply(rid, timeout=5))
        except ConnectionClosed:
            break
    # Every reply may be read before the close frame is: read on (pushes
    # may come first) until the connection closes.
    with contextlib.suppress(ConnectionClosed):
        while True:
            await c.recv(timeout=10)
    assert c.ws.close_code == 1001
    assert {r["type"] for r in answered} <= {"purchased", "error"}
    assert {r["code"] for r in answered if r["type"] == "error"} <= {"unavailable"}
    bought = [r for r in answered if r["type"] == "purchased"]
    server.start()
    state = (await _snapshot(server, [user]))[user]
    # Every acknowledged purchase is there, and nothing unacknowledged is.
    assert state["balance"] == 50 - 5 * len(bought)
    assert state["version"] == 1 + len(bought)
    assert sum(e["amount"] for e in state["history"]) == state["balance"]
    server.stop()


async def test_idle_users_are_passivated_and_come_back(ray_address: str, tmp_path: object) -> None:
    from pathlib import Path

    server = ServerProcess(
        Path(str(tmp_path)) / "p", ray_address, env={"LOADOUT_IDLE_SECONDS": "1"}
    )
    server.start()
    try:
        user = new_user()
        async with await Client.open(server, "ops", role=Role.ADMIN) as admin:
            await admin.request({"type": "grant", "user": user, "amount": 100, "key": "g"})
        async with await Client.open(server, user) as c:
            buy = {"type": "purchase", "key": "once", "sku": "plat.booster.xp", "price": 5}
            first = await c.request(buy)
            shard = ray.get_actor(
                shard_name(first_shard_of(user, server.shards)), namespace=server.namespace
            )
            for _ in range(50):
                stats = await shard.stats.remote()
                if stats["passivations"] >= 1 and stats["users"] == 0:
                    break
                await asyncio.sleep(0.2)
            assert stats["users"] == 0 and stats["passivations"] >= 1, stats
            replay = await c.request(buy)  # the key comes back from the journal
            assert {**replay, "rid": 0} == {**first, "rid": 0}
            state = await c.request({"type": "state"})
            assert state["balance"] == 95 and state["version"] == 2
            assert (await shard.stats.remote())["activations"] >= 2
    finally:
        server.stop()
