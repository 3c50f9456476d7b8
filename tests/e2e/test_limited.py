"""Shared allowances (PROTOCOL.md §10): limited stock is never oversold and a
promo code never over-redeemed, under concurrency and a shard crash."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import ray

from actors.allowance import allowance_id
from actors.catalog import demo_catalog_text
from actors.routing import shard_name
from protocol.messages import Role
from tests.e2e.support import Client, ServerProcess, first_shard_of, new_user
from tests.e2e.test_cli import make_database

EXTRA = """
[[items]]
sku = "lim.skin"
name = "Limited Skin"
kind = "non_consumable"
price = 10
slot = "skin"
stock = 50

[[promos]]
code = "TEN"
gems = 5
max_uses = 10
"""


def _start(server: ServerProcess, tmp_path: Path) -> ServerProcess:
    path = tmp_path / "catalog.toml"
    path.write_text(demo_catalog_text() + EXTRA)
    make_database(server.data_dir)  # (only ``serve`` makes one)
    result = server.cli("catalog", "load", str(path))
    assert result.returncode == 0, result.stderr
    server.extra_env["LOADOUT_STARTING_BALANCE"] = "100"
    return server.start()


async def _settle(clients: list[Client], message: dict[str, Any]) -> list[dict[str, Any]]:
    """Send to every client at once; retry `unavailable` with the same key."""
    pending = {i: await c.send({**message, "key": "once"}) for i, c in enumerate(clients)}
    replies: dict[int, dict[str, Any]] = {}
    for _ in range(40):
        for i, rid in list(pending.items()):
            reply = await clients[i].reply(rid, timeout=30)
            if reply.get("code") == "unavailable":
                pending[i] = await clients[i].send({**message, "key": "once"})
            else:
                replies[i] = reply
                del pending[i]
        if not pending:
            break
        await asyncio.sleep(0.25)
    assert not pending, "requests never settled"
    return [replies[i] for i in range(len(clients))]


async def test_stock_survives_a_crash_of_its_shard(
    fresh_server: ServerProcess, tmp_path: Path
) -> None:
    server = _start(fresh_server, tmp_path)
    users = [new_user("b") for _ in range(200)]
    clients = [await Client.open(server, u) for u in users]
    try:
        stock_shard = first_shard_of(allowance_id("stock", "lim.skin"), server.shards)
        actor = ray.get_actor(shard_name(stock_shard), namespace=server.namespace)
        buy = {"type": "purchase", "sku": "lim.skin", "price": 10}
        crash = asyncio.get_running_loop().call_later(
            0.05, lambda: ray.kill(actor, no_restart=False)
        )
        replies = await _settle(clients, buy)
        crash.cancel()
        stats = await actor.stats.remote()
        assert stats["epoch"] >= 2, "the stock's shard was not restarted: the test proved nothing"
        kinds = [r["type"] if r["type"] != "error" else r["code"] for r in replies]
        assert kinds.count("purchased") == 50, sorted(set(kinds))
        assert kinds.count("sold_out") == 150
        async with await Client.open(server, "ops", role=Role.ADMIN) as admin:
            holders = 0
            for u, reply in zip(users, replies, strict=True):
                state = await admin.request({"type": "inspect", "user": u})
                has = [i for i in state["inventory"] if i["sku"] == "lim.skin"]
                holders += len(has)
                assert state["balance"] == (90 if reply["type"] == "purchased" else 100), u
                assert bool(has) == (reply["type"] == "purchased"), u
        assert holders == 50
        for _ in range(50):  # the stock's shard announces what is left
            page = await clients[0].request({"type": "catalog", "limit": 200})
            item = next(i for i in page["items"] if i["sku"] == "lim.skin")
            if item["stock_left"] == 0:
                break
            await asyncio.sleep(0.1)
        assert item["stock_left"] == 0
        # More stock in a new catalog version: sold units stay counted.
        path = tmp_path / "more.toml"
        path.write_text((demo_catalog_text() + EXTRA).replace("stock = 50", "stock = 60"))
        assert server.cli("catalog", "load", str(path)).returncode == 0
        await clients[0].push("catalog_changed", timeout=20)
        async with await Client.open(server, new_user("late")) as late:
            again = await late.request({**buy, "key": "late"})
            assert again["type"] == "purchased", again
            for _ in range(50):
                page = await late.request({"type": "catalog", "limit": 200})
                item = next(i for i in page["items"] if i["sku"] == "lim.skin")
                if item["stock_left"] == 9:
                    break
                await asyncio.sleep(0.1)
            assert item["stock_left"] == 9
    finally:
        for c in clients:
            await c.close()
    server.stop()


async def test_promo_code_is_never_over_redeemed(
    fresh_server: ServerProcess, tmp_path: Path
) -> None:
    server = _start(fresh_server, tmp_path)
    users = [new_user("r") for _ in range(100)]
    clients = [await Client.open(server, u) for u in users]
    try:
        replies = await _settle(clients, {"type": "redeem", "code": "TEN"})
        ok = [r for r in replies if r["type"] == "redeemed"]
        assert len(ok) == 10
        assert {r["code"] for r in replies if r["type"] == "error"} == {"limit_exceeded"}
        assert all(r["gems"] == 5 and r["balance"] == 105 and r["items"] == [] for r in ok)
        winner = clients[replies.index(ok[0])]
        again = await winner.request({"type": "redeem", "code": "TEN", "key": "twice"})
        assert again["code"] == "limit_exceeded"  # once per user
        unknown = await clients[0].request({"type": "redeem", "code": "NOPE", "key": "u"})
        assert unknown["code"] == "unknown_code"
    finally:
        for c in clients:
            await c.close()
    server.stop()
