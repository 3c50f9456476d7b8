"""``bench.bulkload`` writes registered users as the product would have: a
real shard host serves them (state, purchase) and ``loadout verify`` finds
the database clean.  No timing is asserted (BENCHMARKS.md, "Scale")."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import msgspec
import pytest

from actors.catalog import demo_catalog_text
from actors.catalog_source import publish_catalog_text
from actors.shard.host import ShardHost, ShardSettings
from bench.bulkload import bulk_load, rows_of, user_id
from persistence.embedded import EmbeddedPostgres
from persistence.schema import migrate
from protocol.messages import Purchase, State
from server.verify import verify
from tests.server.test_verify_database import create_database

REPO = Path(__file__).resolve().parents[2]
COUNT, BALANCE = 2500, 700
_decoder = msgspec.msgpack.Decoder()


@pytest.fixture(scope="module")
def pg_admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedPostgres(tmp_path_factory.mktemp("bulk-pg"))
    try:
        yield server.start()
    finally:
        server.stop()


async def _database(admin: str, name: str) -> str:
    dsn = await create_database(admin, name)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:
        await migrate(pool)
        await publish_catalog_text(pool, demo_catalog_text(), "demo")
    finally:
        await pool.close()
    return dsn


async def test_loaded_users_are_served_and_verify_is_clean(pg_admin: str, redis_url: str) -> None:
    dsn = await _database(pg_admin, "bulk_served")
    con = await asyncpg.connect(dsn)
    try:
        result = await bulk_load(con, COUNT, prefix="b", balance=BALANCE, chunk=1000)
        assert result.users == COUNT and result.rows == 3 * COUNT
        counts = [
            await con.fetchval(f"SELECT count(*) FROM {t}") for t in ("users", "journal", "ledger")
        ]
        assert counts == [COUNT] * 3
    finally:
        await con.close()
    host = ShardHost(ShardSettings(shard=0, database_url=dsn, redis_url=redis_url))
    await host.start()
    users = [user_id("b", 0), user_id("b", 1234), user_id("b", COUNT - 1)]
    try:
        buy = Purchase(rid=0, key="k1", sku="plat.booster.xp", price=5, quantity=2)
        batch = [(u, State(rid=0)) for u in users] + [(u, buy) for u in users]
        replies = [_decoder.decode(r) for r in await host.apply_batch(host.catalog.version, batch)]
        states, bought = replies[:3], replies[3:]
        assert [(s["type"], s["version"], s["balance"]) for s in states] == [
            ("state", 1, BALANCE)
        ] * 3
        assert [p["profile"] for p in states[0]["profiles"]] == ["main"]
        assert [(p["type"], p["version"], p["balance"]) for p in bought] == [
            ("purchased", 2, BALANCE - 10)
        ] * 3
    finally:
        await host.close()
    con = await asyncpg.connect(dsn)
    try:
        report = await verify(con)
    finally:
        await con.close()
    assert report.violations == [] and report.ok
    assert report.users == COUNT


async def test_a_chunk_that_meets_an_existing_user_writes_nothing(pg_admin: str) -> None:
    dsn = await _database(pg_admin, "bulk_overlap")
    con = await asyncpg.connect(dsn)
    try:
        await bulk_load(con, 100, prefix="o", balance=5)
        with pytest.raises(asyncpg.UniqueViolationError):
            await bulk_load(con, 100, prefix="o", start=50, balance=5, chunk=100)
        counts = [
            await con.fetchval(f"SELECT count(*) FROM {t}") for t in ("users", "journal", "ledger")
        ]
        assert counts == [100] * 3
        report = await verify(con)
        assert report.ok and report.users == 100
    finally:
        await con.close()


def test_a_registered_user_has_a_first_change() -> None:
    with pytest.raises(ValueError):
        rows_of("x", 0, 1)


def test_the_command_loads_into_the_servers_database(pg_admin: str, tmp_path: Path) -> None:
    import asyncio

    dsn = asyncio.run(_database(pg_admin, "bulk_command"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOADOUT_", "RAY_ADDRESS"))}
    env.update(PYTHONPATH=str(REPO), LOADOUT_DATABASE_URL=dsn, LOADOUT_DATA_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "bench", "users", "load", "--count", "300",
         "--prefix", "c", "--chunk", "128"],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "loaded 300 users (900 rows)" in done.stdout
    verified = subprocess.run(
        [sys.executable, "-m", "server.cli", "verify", "--json"],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert msgspec.json.decode(verified.stdout)["users"] == 300
