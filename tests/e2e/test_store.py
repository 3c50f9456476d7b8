"""Store extensions (PROTOCOL.md §10) over real WebSockets: categories,
sales, bundles, purchase limits, time-limited items, name-change cards."""

from __future__ import annotations

import time
from pathlib import Path

from actors.catalog import demo_catalog_text
from tests.e2e.support import Client, ServerProcess, fund, new_user
from tests.e2e.test_cli import make_database


async def test_categories(server: ServerProcess) -> None:
    async with await Client.open(server, new_user()) as c:
        every = await c.request({"type": "categories"})
        counts = {e["category"]: e["count"] for e in every["items"]}
        assert counts["weapon_skins"] == 3 and counts["utility"] == 4
        kart = await c.request({"type": "categories", "game": "kart"})
        names = [e["category"] for e in kart["items"]]
        assert "kart_bodies" in names and "weapon_skins" not in names and "utility" in names


async def test_sale_price_is_the_price_now(server: ServerProcess) -> None:
    user = new_user()
    await fund(server, user, 500)
    async with await Client.open(server, user) as c:
        page = await c.request({"type": "catalog", "game": "br", "category": "emotes"})
        (emote,) = page["items"]
        assert (emote["price"], emote["base_price"]) == (90, 120)
        assert emote["sale_ends_at"] > time.time() * 1000
        at_base = await c.request({"type": "purchase", "key": "a", "sku": "br.emote.dance",
                                   "price": 120})  # fmt: skip
        assert at_base["code"] == "price_changed"
        bought = await c.request({"type": "purchase", "key": "b", "sku": "br.emote.dance",
                                  "price": 90})  # fmt: skip
        assert bought["total"] == 90 and bought["balance"] == 410


async def test_bundle_is_all_or_nothing(server: ServerProcess) -> None:
    user = new_user()
    await fund(server, user, 2000)
    async with await Client.open(server, user) as c, await Client.open(server, user) as other:
        page = await c.request({"type": "catalog", "game": "br", "category": "bundles"})
        (bundle,) = page["items"]
        assert bundle["bundle"] == [
            {"sku": "br.rifle.tiger", "quantity": 1},
            {"sku": "plat.life.extra", "quantity": 3},
        ]
        assert bundle["bundle_gems"] == 100
        bought = await c.request({"type": "purchase", "key": "b1", "sku": "br.bundle.starter",
                                  "price": 600})  # fmt: skip
        assert bought["type"] == "purchased" and bought["balance"] == 2000 - 600 + 100
        push = await other.push("inventory", version=bought["version"])
        assert sorted((i["sku"], i["quantity"]) for i in push["items"]) == [
            ("br.rifle.tiger", 1), ("plat.life.extra", 3),
        ]  # fmt: skip
        state = await c.request({"type": "state"})
        assert [i["sku"] for i in state["inventory"]] == ["br.rifle.tiger", "plat.life.extra"]
        history = await c.request({"type": "history", "limit": 1})
        assert history["entries"][0]["amount"] == -500  # 600 paid, 100 granted back
        # The rifle is held now: a second bundle is refused whole.
        again = await c.request({"type": "purchase", "key": "b2", "sku": "br.bundle.starter",
                                 "price": 600})  # fmt: skip
        assert again["code"] == "limit_exceeded"
        after = await c.request({"type": "state"})
        assert {k: v for k, v in after.items() if k != "rid"} == {
            k: v for k, v in state.items() if k != "rid"
        }


async def test_purchase_limit_with_retry_after(server: ServerProcess) -> None:
    user = new_user()
    await fund(server, user, 100)
    async with await Client.open(server, user) as c:
        chest = {"type": "purchase", "sku": "plat.chest.daily", "price": 10}
        assert (await c.request({**chest, "key": "d1"}))["type"] == "purchased"
        refused = await c.request({**chest, "key": "d2"})
        assert refused["code"] == "limit_exceeded"
        assert 86_000_000 < refused["retry_after_ms"] <= 86_400_000
        page = await c.request({"type": "catalog", "category": "utility", "limit": 200})
        chest_item = next(i for i in page["items"] if i["sku"] == "plat.chest.daily")
        assert chest_item["limit"] == {"count": 1, "per_seconds": 86_400}


async def test_time_limited_item_and_extension(server: ServerProcess) -> None:
    user = new_user()
    await fund(server, user, 200)
    async with await Client.open(server, user) as c:
        trial = {"type": "purchase", "sku": "br.skin.ghost.trial", "price": 50}
        before = time.time_ns() // 1_000_000  # the server's clock, in whole ms
        await c.request({**trial, "key": "t1"})
        (held,) = (await c.request({"type": "state"}))["inventory"]
        week = 7 * 86_400_000
        assert before + week <= held["expires_at"] <= time.time() * 1000 + week
        await c.request({**trial, "key": "t2"})  # buying again extends
        (extended,) = (await c.request({"type": "state"}))["inventory"]
        assert extended["quantity"] == 1 and extended["expires_at"] == held["expires_at"] + week


async def test_rename_profile_uses_a_card(server: ServerProcess) -> None:
    user = new_user()
    await fund(server, user, 500)
    async with await Client.open(server, user) as c:
        rename = {"type": "rename_profile", "key": "r1", "profile": "main", "name": "hero"}
        assert (await c.request(rename))["code"] == "not_owned"
        await c.request({"type": "purchase", "key": "p", "sku": "plat.card.rename", "price": 100})
        await c.request({"type": "create_profile", "profile": "taken"})
        taken = await c.request({**rename, "key": "r0", "name": "taken"})
        assert taken["code"] == "profile_exists"
        done = await c.request(rename)
        assert done["type"] == "profile_renamed" and done["profile"] == "hero"
        replay = await c.request(rename)
        assert replay["version"] == done["version"]
        state = await c.request({"type": "state"})
        assert [p["profile"] for p in state["profiles"]] == ["hero", "taken"]
        assert state["inventory"] == []  # the card was used up


async def test_items_expire_on_time_with_pushes(
    fresh_server: ServerProcess, tmp_path: Path
) -> None:
    text = demo_catalog_text() + (
        '\n[[items]]\nsku = "br.badge.flash"\nname = "Flash Badge"\ngame = "br"\n'
        'kind = "non_consumable"\nprice = 1\nslot = "badge"\nduration = "2s"\n'
    )
    path = tmp_path / "catalog.toml"
    path.write_text(text)
    server = fresh_server
    make_database(server.data_dir)  # (only ``serve`` makes one)
    assert server.cli("catalog", "load", str(path)).returncode == 0  # before start
    server.start()
    user = new_user()
    await fund(server, user, 10)
    async with await Client.open(server, user) as c:
        bought = await c.request({"type": "purchase", "key": "f", "sku": "br.badge.flash",
                                  "price": 1})  # fmt: skip
        await c.request({"type": "create_profile", "profile": "br", "game": "br"})
        equipped = await c.request({"type": "equip", "profile": "br", "slot": "badge",
                                    "sku": "br.badge.flash"})  # fmt: skip
        assert equipped["type"] == "equipped"
        # No request from here on: the server expires the badge by itself.
        gone = await c.push("inventory", timeout=10, items=[
            {"sku": "br.badge.flash", "quantity": 0, "expires_at": None}])  # fmt: skip
        assert gone["version"] > equipped["version"] > bought["version"]
        loadout = await c.push("loadout", version=gone["version"])
        assert loadout["profile"] == "br" and loadout["equipped"] == {}
        state = await c.request({"type": "state"})
        assert state["inventory"] == [] and state["profiles"][1]["equipped"] == {}
    server.stop()


async def test_items_expire_on_time_after_a_crash(
    fresh_server: ServerProcess, tmp_path: Path
) -> None:
    """The shard that starts after a crash expires items of users it has not
    loaded, without waiting for a request (their next expiry is on the row)."""
    text = demo_catalog_text() + (
        '\n[[items]]\nsku = "br.badge.slow"\nname = "Slow Badge"\ngame = "br"\n'
        'kind = "non_consumable"\nprice = 1\nslot = "badge"\nduration = "15s"\n'
    )
    path = tmp_path / "catalog.toml"
    path.write_text(text)
    server = fresh_server
    make_database(server.data_dir)  # (only ``serve`` makes one)
    assert server.cli("catalog", "load", str(path)).returncode == 0
    server.start()
    user = new_user()
    await fund(server, user, 10)
    async with await Client.open(server, user) as c:
        bought = await c.request({"type": "purchase", "key": "s", "sku": "br.badge.slow",
                                  "price": 1})  # fmt: skip
        assert bought["type"] == "purchased"
    server.kill()
    server.start()
    async with await Client.open(server, user) as c:  # no request: just listen
        gone = await c.push("inventory", timeout=30, items=[
            {"sku": "br.badge.slow", "quantity": 0, "expires_at": None}])  # fmt: skip
        assert gone["version"] == bought["version"] + 1
    server.stop()
