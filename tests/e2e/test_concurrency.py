"""Concurrency: one user's mutations never interleave, and one connection's
requests take effect in the order sent (PROTOCOL.md §2)."""

from __future__ import annotations

from tests.e2e.support import Client, ServerProcess, fund, new_user


async def test_forty_purchases_five_connections_funds_for_ten(server: ServerProcess) -> None:
    user = new_user()
    await fund(server, user, 10 * 250)
    clients = [await Client.open(server, user) for _ in range(5)]
    try:
        rids = []
        for n in range(40):  # 8 per connection, all sent before any reply is read
            c = clients[n % 5]
            rid = await c.send(
                {"type": "purchase", "key": f"buy-{n}", "sku": "br.rifle.tiger", "price": 250}
            )
            rids.append((c, rid))
        # A non-stackable skin: exactly one can succeed; use a stackable item too.
        replies = [await c.reply(rid) for c, rid in rids]
        assert sum(r["type"] == "purchased" for r in replies) == 1
        assert {r["code"] for r in replies if r["type"] == "error"} == {"limit_exceeded"}

        user2 = new_user()
        await fund(server, user2, 10 * 20)
        more = [await Client.open(server, user2) for _ in range(5)]
        try:
            pending = []
            for n in range(40):
                c = more[n % 5]
                buy = {"type": "purchase", "key": f"x{n}", "sku": "plat.life.extra", "price": 20}
                pending.append((c, await c.send(buy)))
            results = [await c.reply(rid) for c, rid in pending]
            ok = [r for r in results if r["type"] == "purchased"]
            assert len(ok) == 10
            assert {r["code"] for r in results if r["type"] == "error"} == {"insufficient_funds"}
            assert all(r["balance"] >= 0 for r in ok)
            assert sorted(r["balance"] for r in ok) == [20 * i for i in range(10)]
            assert len({r["version"] for r in ok}) == 10
            state = await more[0].request({"type": "state"})
            assert state["balance"] == 0
            assert state["inventory"] == [
                {"sku": "plat.life.extra", "quantity": 10, "expires_at": None}
            ]
        finally:
            for c in more:
                await c.close()
    finally:
        for c in clients:
            await c.close()


async def test_requests_on_one_connection_apply_in_order(server: ServerProcess) -> None:
    user = new_user()
    await fund(server, user, 1000)
    async with await Client.open(server, user) as c:
        # Pipelined without waiting: buy, equip (needs the buy), unequip, equip,
        # consume... each depends on the one before it.
        script = [
            {"type": "purchase", "key": "1", "sku": "br.rifle.dragon", "price": 500},
            {"type": "create_profile", "profile": "p", "game": "br"},
            {"type": "equip", "profile": "p", "slot": "weapon_skin", "sku": "br.rifle.dragon"},
            {"type": "unequip", "profile": "p", "slot": "weapon_skin"},
            {"type": "equip", "profile": "p", "slot": "weapon_skin", "sku": "br.rifle.dragon"},
        ] + [
            {"type": "purchase", "key": f"b{i}", "sku": "plat.booster.xp", "price": 5}
            for i in range(30)
        ] + [
            {"type": "consume", "key": f"c{i}", "sku": "plat.booster.xp"} for i in range(30)
        ]  # fmt: skip
        rids = [await c.send(m) for m in script]
        replies = [await c.reply(rid) for rid in rids]
        assert [r["type"] for r in replies] == [
            "purchased", "profile_created", "equipped", "unequipped", "equipped",
        ] + ["purchased"] * 30 + ["consumed"] * 30  # fmt: skip
        versions = [r["version"] for r in replies]
        assert versions == list(range(2, 2 + len(script)))
        assert [r["quantity"] for r in replies[-30:]] == list(range(29, -1, -1))
