"""The rules of PROTOCOL.md §3 and the error codes of §5, over the wire:
each refusal carries its code and rid, and changes nothing."""

from __future__ import annotations

from typing import Any

from protocol.messages import Role
from tests.e2e.support import Client, ServerProcess, fund, new_user


async def _state(c: Client) -> dict[str, Any]:
    state = await c.request({"type": "state"})
    state.pop("rid")
    return state


async def test_purchase_refusals_change_nothing(server: ServerProcess) -> None:
    user = new_user()
    await fund(server, user, 600)
    async with await Client.open(server, user) as c:
        await c.request({"type": "purchase", "key": "own", "sku": "br.rifle.dragon", "price": 500})
        before = await _state(c)
        cases = [
            ({"sku": "no.such.item", "price": 1}, "unknown_item"),
            ({"sku": "br.rifle.legacy", "price": 100}, "unknown_item"),  # inactive
            ({"sku": "br.glider.phoenix", "price": 800}, "unknown_item"),  # coming soon
            ({"sku": "br.hat.crown", "price": 299}, "price_changed"),
            ({"sku": "br.rifle.dragon", "price": 500}, "limit_exceeded"),  # held already
            ({"sku": "br.hat.crown", "price": 300, "quantity": 2}, "limit_exceeded"),
            ({"sku": "plat.life.extra", "price": 20, "quantity": 100}, "limit_exceeded"),  # max 99
            ({"sku": "kart.body.flame", "price": 400}, "insufficient_funds"),
        ]
        for i, (fields, code) in enumerate(cases):
            reply = await c.request({"type": "purchase", "key": f"k{i}", **fields})
            assert reply["type"] == "error", (fields, reply)
            assert reply["code"] == code, (fields, reply)
            assert isinstance(reply["message"], str) and reply["message"]
        assert await _state(c) == before


async def test_max_quantity_counts_what_is_held(server: ServerProcess) -> None:
    user = new_user()
    await fund(server, user, 10_000)
    async with await Client.open(server, user) as c:
        ok = await c.request(
            {"type": "purchase", "key": "a", "sku": "plat.life.extra", "price": 20, "quantity": 98}
        )
        assert ok["type"] == "purchased"
        over = await c.request(
            {"type": "purchase", "key": "b", "sku": "plat.life.extra", "price": 20, "quantity": 2}
        )
        assert over["code"] == "limit_exceeded"
        last = await c.request(
            {"type": "purchase", "key": "c", "sku": "plat.life.extra", "price": 20}
        )
        assert last["type"] == "purchased" and last["balance"] == 10_000 - 99 * 20


async def test_equip_rules(server: ServerProcess) -> None:
    user = new_user()
    await fund(server, user, 2000)
    async with await Client.open(server, user) as c:
        for key, sku, price in [("1", "br.rifle.dragon", 500), ("2", "plat.avatar.cyber", 150),
                                ("3", "plat.life.extra", 20)]:  # fmt: skip
            bought = await c.request({"type": "purchase", "key": key, "sku": sku, "price": price})
            assert bought["type"] == "purchased"
        await c.request({"type": "create_profile", "profile": "racer", "game": "kart"})
        await c.request({"type": "create_profile", "profile": "soldier", "game": "br"})
        before = await _state(c)

        async def equip(profile: str, slot: str, sku: str) -> dict[str, Any]:
            return await c.request({"type": "equip", "profile": profile, "slot": slot, "sku": sku})

        assert (await equip("nobody", "weapon_skin", "br.rifle.dragon"))[
            "code"
        ] == "unknown_profile"
        assert (await equip("soldier", "hat", "br.hat.crown"))["code"] == "not_owned"
        assert (await equip("racer", "weapon_skin", "br.rifle.dragon"))["code"] == "incompatible"
        assert (await equip("soldier", "hat", "br.rifle.dragon"))["code"] == "incompatible"
        assert (await equip("soldier", "utility", "plat.life.extra"))["code"] == "incompatible"
        unequip = await c.request({"type": "unequip", "profile": "ghost", "slot": "hat"})
        assert unequip["code"] == "unknown_profile"
        assert await _state(c) == before
        # Platform-wide items go on any profile; game items on their game's.
        assert (await equip("racer", "avatar", "plat.avatar.cyber"))["type"] == "equipped"
        assert (await equip("main", "avatar", "plat.avatar.cyber"))["type"] == "equipped"
        assert (await equip("soldier", "weapon_skin", "br.rifle.dragon"))["type"] == "equipped"
        assert (await equip("main", "weapon_skin", "br.rifle.dragon"))["code"] == "incompatible"


async def test_equip_replaces_the_slot(server: ServerProcess) -> None:
    user = new_user()
    await fund(server, user, 1000)
    async with await Client.open(server, user) as c:
        await c.request({"type": "purchase", "key": "a", "sku": "br.rifle.dragon", "price": 500})
        await c.request({"type": "purchase", "key": "b", "sku": "br.rifle.tiger", "price": 250})
        await c.request({"type": "create_profile", "profile": "p", "game": "br"})
        for sku in ("br.rifle.dragon", "br.rifle.tiger"):
            reply = await c.request(
                {"type": "equip", "profile": "p", "slot": "weapon_skin", "sku": sku}
            )
            assert reply["type"] == "equipped"
        state = await _state(c)
        assert state["profiles"][1]["equipped"] == {"weapon_skin": "br.rifle.tiger"}


async def test_consume_rules(server: ServerProcess) -> None:
    user = new_user()
    await fund(server, user, 1000)
    async with await Client.open(server, user) as c:
        await c.request({"type": "purchase", "key": "a", "sku": "br.rifle.dragon", "price": 500})
        await c.request(
            {"type": "purchase", "key": "b", "sku": "plat.life.extra", "price": 20, "quantity": 2}
        )
        before = await _state(c)
        not_consumable = await c.request({"type": "consume", "key": "c1", "sku": "br.rifle.dragon"})
        assert not_consumable["code"] == "incompatible"
        too_many = await c.request(
            {"type": "consume", "key": "c2", "sku": "plat.life.extra", "quantity": 3}
        )
        assert too_many["code"] == "not_owned"
        not_held = await c.request({"type": "consume", "key": "c3", "sku": "plat.booster.xp"})
        assert not_held["code"] == "not_owned"
        unknown = await c.request({"type": "consume", "key": "c4", "sku": "nope"})
        assert unknown["code"] == "unknown_item"
        assert await _state(c) == before
        done = await c.request(
            {"type": "consume", "key": "c5", "sku": "plat.life.extra", "quantity": 2}
        )
        assert done["quantity"] == 0
        assert [i["sku"] for i in (await _state(c))["inventory"]] == ["br.rifle.dragon"]


async def test_profiles(server: ServerProcess) -> None:
    async with await Client.open(server, new_user()) as c:
        first = await c.request({"type": "create_profile", "profile": "alt", "game": None})
        assert first["type"] == "profile_created" and first["game"] is None
        again = await c.request({"type": "create_profile", "profile": "alt", "game": "br"})
        assert again["code"] == "profile_exists"
        main = await c.request({"type": "create_profile", "profile": "main"})
        assert main["code"] == "profile_exists"
        bad_game = await c.request({"type": "create_profile", "profile": "x", "game": "nogame"})
        assert bad_game["code"] == "bad_request"


async def test_idempotency(server: ServerProcess) -> None:
    user = new_user()
    await fund(server, user, 1000)
    async with await Client.open(server, user) as c, await Client.open(server, user) as other:
        request = {"type": "purchase", "key": "same", "sku": "plat.booster.xp", "price": 5,
                   "quantity": 4}  # fmt: skip
        first = await c.request(request)
        replay = await other.request(request)  # another device, same key
        assert replay["rid"] != first["rid"]
        assert {**replay, "rid": None} == {**first, "rid": None}
        state = await _state(c)
        assert state["balance"] == 980 and state["version"] == first["version"]
        conflict = await c.request({**request, "quantity": 5})
        assert conflict["code"] == "idempotency_conflict"
        conflict = await c.request({"type": "consume", "key": "same", "sku": "plat.booster.xp"})
        assert conflict["code"] == "idempotency_conflict"
        assert await _state(c) == state


async def test_failed_request_does_not_burn_its_key(server: ServerProcess) -> None:
    user = new_user()
    async with await Client.open(server, user) as c:
        request = {"type": "purchase", "key": "retry-me", "sku": "plat.booster.xp", "price": 5}
        assert (await c.request(request))["code"] == "insufficient_funds"
        await fund(server, user, 5)
        assert (await c.request(request))["type"] == "purchased"


async def test_player_may_not_make_admin_requests(server: ServerProcess) -> None:
    user = new_user()
    async with await Client.open(server, user) as c:
        before = await _state(c)
        grant = await c.request({"type": "grant", "user": user, "amount": 10**6, "key": "free"})
        assert grant["code"] == "forbidden"
        inspect = await c.request({"type": "inspect", "user": "someone-else"})
        assert inspect["code"] == "forbidden"
        assert await _state(c) == before


async def test_grant_cap(server: ServerProcess) -> None:
    user = new_user()
    await fund(server, user, 2**53 - 10)
    async with await Client.open(server, "ops", role=Role.ADMIN) as admin:
        over = await admin.request({"type": "grant", "user": user, "amount": 11, "key": "k"})
        assert over["code"] == "limit_exceeded"
        seen = await admin.request({"type": "inspect", "user": user})
        assert seen["balance"] == 2**53 - 10
