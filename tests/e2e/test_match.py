"""A match, end to end (PROTOCOL.md §11 with §3, §6 and §10): one match
server's connection watches 100 players spread over two gateways while they
buy, equip and unequip from one or two devices, an operator grants gems, and
an item bought with a short ``duration`` expires mid-match by itself.  At the
end the watcher's view, built only from its ``watching`` snapshots and the
pushes it received, equals every player's ``state``, and per user it never
saw a push out of version order nor a version gap."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from actors.catalog import demo_catalog_text
from protocol.messages import Role
from tests.e2e.match_server import WAIT, Live, WatcherView, gone
from tests.e2e.support import ServerProcess, new_user, two_gateways
from tests.e2e.test_cli import make_database

PLAYERS = 100
ROUNDS = 4
START = 1000  # LOADOUT_STARTING_BALANCE
FLASH = "match.flash"

EXTRA = "".join(
    f'\n[[items]]\nsku = "match.badge.{n}"\nname = "Badge {n}"\ncategory = "match"\n'
    f'kind = "non_consumable"\nprice = 10\nslot = "badge"\n'
    for n in range(ROUNDS)
) + (
    '\n[[items]]\nsku = "match.ammo"\nname = "Ammo"\ncategory = "match"\n'
    'kind = "consumable"\nprice = 1\nstackable = true\n'
    f'\n[[items]]\nsku = "{FLASH}"\nname = "Flash Banner"\ncategory = "match"\n'
    'kind = "non_consumable"\nprice = 5\nslot = "banner"\nduration = "3s"\n'
)


@pytest.fixture(scope="module")
def gateways(
    ray_address: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two gateways sharing shards, PostgreSQL and Redis, with the match's
    catalog published before they start."""
    root = tmp_path_factory.mktemp("match")
    path = root / "catalog.toml"
    path.write_text(demo_catalog_text() + EXTRA)
    make_database(root / "a")  # (only ``serve`` makes one)
    loaded = ServerProcess(root / "a", None).cli("catalog", "load", str(path))
    assert loaded.returncode == 0, loaded.stderr
    env = {"LOADOUT_STARTING_BALANCE": str(START)}
    with two_gateways(root, ray_address, env) as (a, b, _):
        yield a, b
    for proc in (a, b):
        assert "Traceback" not in proc.log_path.read_text(errors="replace"), proc.tail(200)


def _as_view(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": state["version"],
        "balance": state["balance"],
        "inventory": {i["sku"]: i for i in state["inventory"]},
        "profiles": {p["profile"]: p for p in state["profiles"]},
    }


@dataclass
class Player:
    user: str
    devices: list[Live]
    flash: bool
    busy: bool  # plays on while the flash banners expire
    spent: dict[str, int] = field(default_factory=dict)  # purchase id -> total
    granted: int = 0

    def device(self, n: int) -> Live:
        return self.devices[n % len(self.devices)]

    async def buy(self, sku: str, key: str, quantity: int = 1, price: int = 10) -> dict[str, Any]:
        """A purchase, sent on every device at once with one key: one change."""
        buy = {"type": "purchase", "key": key, "sku": sku, "quantity": quantity, "price": price}
        replies = await asyncio.gather(*(d.request(buy) for d in self.devices))
        assert replies[0]["type"] == "purchased", (self.user, replies[0])
        once = {k: v for k, v in replies[0].items() if k != "rid"}
        for other in replies[1:]:
            assert {k: v for k, v in other.items() if k != "rid"} == once, (self.user, replies)
        self.spent[once["purchase"]] = once["total"]
        return once

    async def equip(self, n: int, profile: str, slot: str, sku: str | None) -> None:
        if sku is None:
            message = {"type": "unequip", "profile": profile, "slot": slot}
        else:
            message = {"type": "equip", "profile": profile, "slot": slot, "sku": sku}
        reply = await self.device(n).request(message)
        assert reply["type"] == ("unequipped" if sku is None else "equipped"), (self.user, reply)


def _expiry(pushes: list[dict[str, Any]]) -> int | None:
    """The version of the push that took the flash banner away, if any."""
    for push in pushes:
        if push["type"] == "inventory" and gone(FLASH) in push["items"]:
            version: int = push["version"]
            return version
    return None


async def _flash(p: Player) -> None:
    """Buy the flash banner, wear it in two profiles, then send nothing: the
    server takes it back by itself, with pushes to every device."""
    await p.buy(FLASH, "flash", price=5)
    create = {"type": "create_profile", "profile": "arena", "game": None}
    assert (await p.device(1).request(create))["type"] == "profile_created"
    await p.equip(0, "main", "banner", FLASH)
    await p.equip(1, "arena", "banner", FLASH)
    for d in p.devices:
        await _expires_on(p.user, d)


async def _expires_on(user: str, device: Live) -> None:
    """The device hears the banner leave the inventory and both loadouts."""
    await device.until(
        lambda: _worn_at_expiry(device.pushes) == {"main": {}, "arena": {}},
        lambda: f"{user}: {FLASH} leaves by itself; pushes: {device.pushes}",
    )


def _worn_at_expiry(pushes: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The profiles' loadouts pushed with the flash banner's expiry, if it came."""
    version = _expiry(pushes)
    if version is None:
        return None
    return {x["profile"]: x["equipped"] for x in pushes
            if x["type"] == "loadout" and x["version"] == version}  # fmt: skip


async def _round(p: Player, r: int) -> None:
    await p.buy(f"match.badge.{r}", f"b{r}")
    await p.equip(r, "main", "badge", f"match.badge.{r}")
    await p.buy("match.ammo", f"a{r}", quantity=r + 1, price=1)
    if r % 2:
        await p.equip(r + 1, "main", "badge", None)


async def _play(p: Player, played: asyncio.Event, expired: asyncio.Event) -> None:
    """A player's match: (the flash banner,) rounds, and then some players
    keep equipping until the flash banners have expired, so that they expire
    mid-match; then one last round for all."""
    if p.flash:
        await _flash(p)
    for r in range(ROUNDS):
        await _round(p, r)
        played.set()
    n = 0
    try:
        async with asyncio.timeout(WAIT):
            while p.busy and not expired.is_set():
                await p.equip(n, "main", "badge", None if n % 2 else "match.badge.0")
                n += 1
            await expired.wait()
    except TimeoutError:
        raise AssertionError(f"{p.user}: the flash banners did not expire in {WAIT}s") from None
    await p.equip(n, "main", "badge", f"match.badge.{ROUNDS - 1}")
    await p.buy("match.ammo", "last", price=1)


async def _operate(admin: Live, players: list[Player]) -> None:
    """An operator grants gems to some players during the match (one grant
    sent twice: the same reply, one change); not to those with a flash
    banner, who send nothing (nor anyone for them) while it expires."""
    for n in range(3):
        for p in players:
            grant = {"type": "grant", "user": p.user, "amount": 7 + n, "key": f"g{n}",
                     "reason": "mvp"}  # fmt: skip
            granted = await admin.request(grant)
            assert granted["type"] == "granted", granted
            p.granted += 7 + n
            if n == 0:
                again = await admin.request(grant)
                assert {**again, "rid": 0} == {**granted, "rid": 0}, (granted, again)


async def _watch(watcher: Live, view: WatcherView, users: list[str]) -> None:
    reply = await watcher.request({"type": "watch", "users": users, "inventory": True})
    assert reply["type"] == "watching", reply
    assert [s["user"] for s in reply["users"]] == users
    assert all(u in view.users for u in users)


async def _expiries(
    watcher: Live, view: WatcherView, users: list[str], expired: asyncio.Event
) -> None:
    """The watcher sees every flash banner leave; then the match may end."""

    def left() -> list[str]:
        return [u for u in users if FLASH not in view.users[u].left]

    await watcher.until(lambda: not left(), lambda: f"the watcher never saw {FLASH} leave {left()}")
    expired.set()


async def _connect(a: ServerProcess, b: ServerProcess) -> list[Player]:
    """Players alternate between the gateways; every third one has a second
    device, on the other gateway; every fifth buys the flash banner, and
    every fifth plays on while it expires."""

    async def player(i: int) -> Player:
        user, here, there = new_user(f"p{i}-"), (a, b)[i % 2], (b, a)[i % 2]
        devices = [await Live.open(here, user)]
        if i % 3 == 0:
            devices.append(await Live.open(there, user, binary=True))
        return Player(user, devices, flash=i % 5 == 0, busy=i % 5 == 1)

    return list(await asyncio.gather(*(player(i) for i in range(PLAYERS))))


async def _match(players: list[Player], watcher: Live, view: WatcherView, admin: Live) -> None:
    """The match, with the watcher taking the users' snapshots in two goes:
    most before it starts, the rest once it is under way."""
    late = [p.user for i, p in enumerate(players) if i % 5 == 4]
    await _watch(watcher, view, [p.user for p in players if p.user not in late])
    played, expired = asyncio.Event(), asyncio.Event()
    flash = [p.user for p in players if p.flash]

    async def watch_late() -> None:
        await played.wait()
        await _watch(watcher, view, late)

    granted = [p for i, p in enumerate(players) if i % 5 in (2, 4)]
    try:
        async with asyncio.timeout(120), asyncio.TaskGroup() as match:
            for p in players:
                match.create_task(_play(p, played, expired))
            match.create_task(_operate(admin, granted))
            match.create_task(_expiries(watcher, view, flash, expired))
            match.create_task(watch_late())
    except TimeoutError:
        raise AssertionError("the match did not end within 120 s") from None


async def test_a_match_end_to_end(gateways: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = gateways
    view = WatcherView()

    players = await _connect(a, b)
    watcher = await Live.open(a, "match-server", role=Role.SERVICE, binary=True, on_push=view)
    admin = await Live.open(b, "ops", role=Role.ADMIN)
    connections = [watcher, admin, *(d for p in players for d in p.devices)]
    try:
        await _match(players, watcher, view, admin)
        await _check(players, watcher, view, admin)
        assert [c.strays for c in connections if c.strays] == []
    finally:
        await asyncio.gather(*(c.close() for c in connections))


async def _check(players: list[Player], watcher: Live, view: WatcherView, admin: Live) -> None:
    """Every player's state, asked of the player and inspected by the
    operator, equals the watcher's view of them once its pushes are in."""
    states = await asyncio.gather(*(p.devices[0].request({"type": "state"}) for p in players))
    inspected = await asyncio.gather(
        *(admin.request({"type": "inspect", "user": p.user}) for p in players)
    )
    final = {p.user: _as_view(state) for p, state in zip(players, states, strict=True)}
    for p, state in zip(players, inspected, strict=True):
        assert _as_view(state) == final[p.user], p.user

    def behind() -> list[str]:
        return [u for u, v in final.items() if view.users[u].version < v["version"]]

    await watcher.until(
        lambda: not behind(),
        lambda: f"the watcher lags on {behind()}; first faults: {view.faults[:5]}",
    )
    assert view.faults == []
    for p in players:
        assert view.as_state(p.user) == final[p.user], p.user
        state = final[p.user]
        assert state["balance"] == START + p.granted - sum(p.spent.values()), p.user
        assert FLASH not in state["inventory"], p.user
        for profile in state["profiles"].values():
            assert "banner" not in profile["equipped"], (p.user, profile)
        if p.flash:
            assert FLASH in view.users[p.user].left, p.user
            assert set(state["profiles"]) == {"main", "arena"}
