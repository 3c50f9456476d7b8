"""Every player and admin request of PROTOCOL.md §3 and §6, over real
WebSockets, in both subprotocols."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest

from protocol.messages import Role
from tests.e2e.support import Client, ServerProcess, fund, new_user

pytestmark = pytest.mark.parametrize("binary", [False, True], ids=["json", "msgpack"])


async def test_welcome_and_state_of_a_new_user(server: ServerProcess, binary: bool) -> None:
    user = new_user()
    async with await Client.open(server, user, binary=binary) as c:
        assert c.welcome["user"] == user
        assert c.welcome["role"] == "player"
        assert c.welcome["protocol"] == 1
        assert isinstance(c.welcome["server_time"], int)
        state = await c.request({"type": "state", "rid": "s-1"})
    assert state == {
        "type": "state",
        "rid": "s-1",
        "user": user,
        "version": 0,
        "balance": 0,
        "inventory": [],
        "profiles": [{"profile": "main", "game": None, "equipped": {}}],
        "contact": {"email": None, "address": None},
        "debt": 0,
    }


async def test_catalog_filters_and_paging(server: ServerProcess, binary: bool) -> None:
    async with await Client.open(server, new_user(), binary=binary) as c:
        everything = await c.request({"type": "catalog", "limit": 200})
        assert everything["next"] is None
        skus = [i["sku"] for i in everything["items"]]
        assert skus == sorted(skus) and "br.rifle.dragon" in skus and "kart.body.flame" in skus
        item = next(i for i in everything["items"] if i["sku"] == "br.rifle.dragon")
        assert item == {
            "sku": "br.rifle.dragon",
            "name": "Dragon Rifle Skin",
            "game": "br",
            "category": "weapon_skins",
            "kind": "non_consumable",
            "delivery": "in_game",
            "price": 500,
            "slot": "weapon_skin",
            "stackable": False,
            "max_quantity": 1,
            "status": "active",
            "metadata": {"rarity": "legendary", "weapon_type": "rifle"},
            "base_price": 500,
            "sale_ends_at": None,
            "stock_left": None,
            "bundle": None,
            "bundle_gems": 0,
            "limit": None,
            "duration_seconds": None,
        }
        br = await c.request({"type": "catalog", "game": "br", "limit": 200})
        games = {i["game"] for i in br["items"]}
        assert games == {"br", None}
        skins = await c.request({"type": "catalog", "game": "br", "category": "weapon_skins"})
        assert {i["category"] for i in skins["items"]} == {"weapon_skins"}
        paged: list[str] = []
        cursor = None
        while True:
            page = await c.request({"type": "catalog", "limit": 3, "cursor": cursor})
            assert len(page["items"]) <= 3
            paged += [i["sku"] for i in page["items"]]
            cursor = page["next"]
            if cursor is None:
                break
        assert paged == skus
        bad = await c.request({"type": "catalog", "cursor": "%%%"})
        assert bad["code"] == "bad_request"


async def test_purchase_consume_history(server: ServerProcess, binary: bool) -> None:
    user = new_user()
    await fund(server, user, 1000)
    async with await Client.open(server, user, binary=binary) as c:
        bought = await c.request(
            {"type": "purchase", "key": "p1", "sku": "plat.life.extra", "quantity": 3, "price": 20}
        )
        assert bought["type"] == "purchased"
        assert bought["sku"] == "plat.life.extra"
        assert (bought["quantity"], bought["total"], bought["balance"]) == (3, 60, 940)
        assert isinstance(bought["purchase"], str) and bought["version"] == 2
        used = await c.request({"type": "consume", "key": "c1", "sku": "plat.life.extra"})
        assert used == {
            "type": "consumed", "rid": used["rid"], "sku": "plat.life.extra", "quantity": 2,
            "version": 3,
        }  # fmt: skip
        state = await c.request({"type": "state"})
        assert state["inventory"] == [{"sku": "plat.life.extra", "quantity": 2, "expires_at": None}]
        assert state["balance"] == 940
        history = await c.request({"type": "history"})
        entries = history["entries"]
        assert [e["kind"] for e in entries] == ["purchase", "grant"]
        assert entries[0] == {
            "seq": 2, "at": entries[0]["at"], "kind": "purchase", "amount": -60, "balance": 940,
            "sku": "plat.life.extra", "quantity": 3, "key": "p1",
        }  # fmt: skip
        assert entries[1]["amount"] == 1000 and entries[1]["balance"] == 1000
        assert history["next"] is None
        first = await c.request({"type": "history", "limit": 1})
        assert [e["seq"] for e in first["entries"]] == [2] and first["next"] == 2
        rest = await c.request({"type": "history", "before": first["next"], "limit": 1})
        assert [e["seq"] for e in rest["entries"]] == [1] and rest["next"] is None


async def test_profiles_equip_unequip(server: ServerProcess, binary: bool) -> None:
    user = new_user()
    await fund(server, user, 1000)
    async with await Client.open(server, user, binary=binary) as c:
        await c.request({"type": "purchase", "key": "a", "sku": "br.rifle.dragon", "price": 500})
        created = await c.request({"type": "create_profile", "profile": "sniper", "game": "br"})
        assert (created["type"], created["profile"], created["game"]) == (
            "profile_created", "sniper", "br",
        )  # fmt: skip
        equipped = await c.request(
            {"type": "equip", "profile": "sniper", "slot": "weapon_skin", "sku": "br.rifle.dragon"}
        )
        assert equipped["type"] == "equipped" and equipped["sku"] == "br.rifle.dragon"
        state = await c.request({"type": "state"})
        assert state["profiles"] == [
            {"profile": "main", "game": None, "equipped": {}},
            {"profile": "sniper", "game": "br", "equipped": {"weapon_skin": "br.rifle.dragon"}},
        ]
        gone = await c.request({"type": "unequip", "profile": "sniper", "slot": "weapon_skin"})
        assert gone["type"] == "unequipped" and gone["version"] > equipped["version"]
        state = await c.request({"type": "state"})
        assert state["profiles"][1]["equipped"] == {}


async def test_admin_grant_and_inspect(server: ServerProcess, binary: bool) -> None:
    user = new_user()
    async with await Client.open(server, "ops", binary=binary, role=Role.ADMIN) as admin:
        granted = await admin.request(
            {"type": "grant", "user": user, "amount": 250, "key": "g1", "reason": "welcome"}
        )
        assert granted == {
            "type": "granted", "rid": granted["rid"], "user": user, "balance": 250, "version": 1,
        }  # fmt: skip
        again = await admin.request(
            {"type": "grant", "user": user, "amount": 250, "key": "g1", "reason": "welcome"}
        )
        assert again["balance"] == 250 and again["version"] == 1
        seen = await admin.request({"type": "inspect", "user": user})
        assert seen["type"] == "state" and seen["user"] == user and seen["balance"] == 250
    async with await Client.open(server, "match-1", binary=binary, role=Role.SERVICE) as svc:
        seen = await svc.request({"type": "inspect", "user": user})
        assert seen["balance"] == 250
        refused = await svc.request({"type": "grant", "user": user, "amount": 1, "key": "x"})
        assert refused["code"] == "forbidden"


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


async def test_metrics(server: ServerProcess, binary: bool) -> None:
    async with await Client.open(server, new_user(), binary=binary) as c:
        await c.request({"type": "state"})
        await c.request({"type": "purchase", "key": "k", "sku": "plat.booster.xp", "price": 5})
        await c.send_raw(c.encode([1]))
        await c.recv()
        text = await asyncio.to_thread(_get, f"http://127.0.0.1:{server.http_port}/metrics")
    assert 'loadout_requests_total{outcome="ok",type="state"}' in text
    assert 'loadout_requests_total{outcome="insufficient_funds",type="purchase"}' in text
    assert 'loadout_requests_total{outcome="bad_request",type="invalid"}' in text
    assert "\nloadout_connections " in text
    assert 'loadout_request_seconds_bucket{le="0.05",type="state"}' in text
    assert "loadout_shard_batch_size_count" in text
