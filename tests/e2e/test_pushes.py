"""Pushes reach every connection of the user (PROTOCOL.md §4)."""

from __future__ import annotations

from protocol.messages import Role
from tests.e2e.support import Client, ServerProcess, fund, new_user


async def test_purchase_pushes_inventory_to_other_connections(server: ServerProcess) -> None:
    user = new_user()
    await fund(server, user, 1000)
    async with (
        await Client.open(server, user) as phone,
        await Client.open(server, user, binary=True) as console,
    ):
        bought = await phone.request(
            {"type": "purchase", "key": "k", "sku": "plat.life.extra", "price": 20, "quantity": 2}
        )
        push = await console.push("inventory", version=bought["version"])
        assert push == {
            "type": "inventory",
            "version": bought["version"],
            "balance": 960,
            "items": [{"sku": "plat.life.extra", "quantity": 2, "expires_at": None}],
        }
        # The connection that made the change gets it too.
        assert (await phone.push("inventory", version=bought["version"]))["balance"] == 960
        used = await console.request(
            {"type": "consume", "key": "c", "sku": "plat.life.extra", "quantity": 2}
        )
        gone = await phone.push("inventory", version=used["version"])
        assert gone["items"] == [{"sku": "plat.life.extra", "quantity": 0, "expires_at": None}]


async def test_equip_pushes_loadout(server: ServerProcess) -> None:
    user = new_user()
    await fund(server, user, 1000)
    async with await Client.open(server, user) as a, await Client.open(server, user) as b:
        await a.request({"type": "purchase", "key": "k", "sku": "plat.frame.gold", "price": 200})
        equipped = await a.request(
            {"type": "equip", "profile": "main", "slot": "frame", "sku": "plat.frame.gold"}
        )
        push = await b.push("loadout", version=equipped["version"])
        assert push == {
            "type": "loadout",
            "version": equipped["version"],
            "profile": "main",
            "game": None,
            "equipped": {"frame": "plat.frame.gold"},
        }
        off = await a.request({"type": "unequip", "profile": "main", "slot": "frame"})
        assert (await b.push("loadout", version=off["version"]))["equipped"] == {}


async def test_admin_grant_pushes_to_the_user(server: ServerProcess) -> None:
    user = new_user()
    async with (
        await Client.open(server, user) as player,
        await Client.open(server, "ops", role=Role.ADMIN) as admin,
    ):
        granted = await admin.request({"type": "grant", "user": user, "amount": 77, "key": "g"})
        push = await player.push("inventory", version=granted["version"])
        assert push == {
            "type": "inventory",
            "version": granted["version"],
            "balance": 77,
            "items": [],
        }


async def test_pushes_are_per_user(server: ServerProcess) -> None:
    alice, bob = new_user(), new_user()
    async with await Client.open(server, bob) as b:
        await fund(server, alice, 100)
        await fund(server, bob, 5)  # bob's own push, to know when delivery has happened
        await b.push("inventory", balance=5)
        assert [p for p in b.pushes if p["type"] == "inventory"] == []
