"""The lock baseline (``python -m bench.lock_server``) behind the real
gateway: the replies the bench relies on have the actor core's shapes,
idempotency and the rules hold, pushes arrive, and what it does not implement
says so; it starts no Ray and creates its own tables."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest

from bench.lock_schema import create_lock_tables
from protocol.messages import Role
from server.app import read_services
from tests.e2e.support import Client, ServerProcess, new_user

LOCK_TABLES = {
    "lock_wallets", "lock_purchases", "lock_inventory", "lock_ledger", "lock_grants",
    "lock_profiles", "lock_equipped",
}  # fmt: skip


@pytest.fixture(scope="module")
def lock_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data_dir: Path = tmp_path_factory.mktemp("lock-core")
    server = ServerProcess(data_dir, None, serve=("bench.lock_server",)).start()
    try:
        yield server
    finally:
        server.stop()


async def test_purchase_equip_state_and_pushes(lock_server: ServerProcess) -> None:
    user = new_user()
    async with (
        await Client.open(lock_server, "ops", role=Role.ADMIN) as admin,
        await Client.open(lock_server, user, binary=True) as c,
        await Client.open(lock_server, user) as watcher,
    ):
        granted = await admin.request(
            {"type": "grant", "user": user, "amount": 1000, "key": "g1", "reason": "t"}
        )
        assert granted == {**granted, "type": "granted", "user": user, "balance": 1000}
        again = await admin.request(
            {"type": "grant", "user": user, "amount": 1000, "key": "g1", "reason": "t"}
        )
        assert again["balance"] == 1000 and again["version"] == granted["version"]

        buy = {"type": "purchase", "key": "k1", "sku": "plat.frame.gold", "price": 200}
        bought = await c.request(buy)
        assert bought["type"] == "purchased" and bought["balance"] == 800
        assert bought["total"] == 200 and bought["quantity"] == 1
        assert (await c.request(buy))["purchase"] == bought["purchase"]  # replayed
        conflict = await c.request({**buy, "sku": "plat.booster.xp", "price": 5})
        assert conflict["code"] == "idempotency_conflict"
        twice = await c.request({**buy, "key": "k2"})
        assert twice["code"] == "limit_exceeded"
        assert (await c.request({**buy, "key": "k3", "price": 1}))["code"] == "price_changed"
        push = await watcher.push("inventory", version=bought["version"])
        assert push["balance"] == 800
        assert push["items"] == [{"sku": "plat.frame.gold", "quantity": 1, "expires_at": None}]

        equip = {"type": "equip", "profile": "main", "slot": "frame", "sku": "plat.frame.gold"}
        equipped = await c.request(equip)
        assert equipped["type"] == "equipped" and equipped["version"] == bought["version"] + 1
        loadout = await watcher.push("loadout", version=equipped["version"])
        assert loadout["equipped"] == {"frame": "plat.frame.gold"}
        state = await c.request({"type": "state"})
        assert state["balance"] == 800 and state["version"] == equipped["version"]
        assert state["profiles"] == [
            {"profile": "main", "game": None, "equipped": {"frame": "plat.frame.gold"}}
        ]
        unequipped = await c.request({"type": "unequip", "profile": "main", "slot": "frame"})
        assert unequipped["type"] == "unequipped"
        noop = await c.request({"type": "unequip", "profile": "main", "slot": "frame"})
        assert noop["version"] == unequipped["version"]
        inspected = await admin.request({"type": "inspect", "user": user})
        assert inspected["type"] == "state" and inspected["profiles"][0]["equipped"] == {}

        poor = await c.request(
            {"type": "purchase", "key": "k4", "sku": "plat.booster.xp", "price": 5,
             "quantity": 1000}
        )  # fmt: skip
        assert poor["code"] == "insufficient_funds"


async def test_unimplemented_requests_are_unavailable(lock_server: ServerProcess) -> None:
    async with await Client.open(lock_server, new_user()) as c:
        reply = await c.request({"type": "history"})
        assert reply["code"] == "unavailable" and "lock baseline" in reply["message"]
        catalog = await c.request({"type": "catalog", "limit": 1})  # the gateway's, as ever
        assert catalog["type"] == "catalog"
        fresh = await c.request({"type": "state"})
        assert fresh["version"] == 0 and fresh["profiles"][0]["profile"] == "main"


def test_starts_no_ray(lock_server: ServerProcess) -> None:
    assert lock_server.process is not None
    children = psutil.Process(lock_server.process.pid).children(recursive=True)
    names = " ".join(" ".join(c.cmdline()) for c in children)
    assert "raylet" not in names and "gcs_server" not in names, names


async def test_creates_its_tables_in_a_database_without_them(lock_server: ServerProcess) -> None:
    """What makes a bench database usable once the product's migrations no
    longer create the lock tables: a scratch database on the lock server's
    PostgreSQL, with no migration applied, gets them (twice: idempotent)."""
    services = read_services(lock_server.data_dir)
    assert services is not None
    name = "lock_scratch_" + uuid.uuid4().hex[:8]
    admin = await asyncpg.connect(services["database_url"])
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        con = await asyncpg.connect(services["database_url"], database=name)
        try:
            await create_lock_tables(con)
            await create_lock_tables(con)
            rows = await con.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
        finally:
            await con.close()
        await admin.execute(f"DROP DATABASE {name}")
    finally:
        await admin.close()
    assert {r["table_name"] for r in rows} == LOCK_TABLES
