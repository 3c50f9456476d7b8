"""``loadout verify`` as an operator runs it: on the data directory of a
server that is not running (its embedded PostgreSQL is started for the
check and stopped after), and on a data directory that is not there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import asyncpg

from actors.catalog import demo_catalog_text
from actors.catalog_source import publish_catalog_text
from actors.shard.host import ShardHost, ShardSettings
from persistence.embedded import EmbeddedPostgres, EmbeddedRedis
from persistence.schema import migrate
from tests.server.test_verify_database import USERS, play

REPO = Path(__file__).resolve().parents[2]


def verify(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOADOUT_", "RAY_ADDRESS"))}
    env.update(LOADOUT_DATA_DIR=str(data_dir), PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "verify", *args],
        env=env, capture_output=True, text=True, timeout=120, cwd=data_dir.parent,
    )  # fmt: skip


async def fill(data_dir: Path, redis_dir: Path) -> None:
    """A data directory as a server leaves it, written by a real shard host."""
    pg, redis = EmbeddedPostgres(data_dir), EmbeddedRedis(redis_dir)
    dsn = pg.start()
    try:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        try:
            await migrate(pool)
            await publish_catalog_text(pool, demo_catalog_text(), "demo")
        finally:
            await pool.close()
        host = ShardHost(ShardSettings(shard=0, database_url=dsn, redis_url=redis.start()))
        await host.start()
        try:
            await play(host)
        finally:
            await host.close()
    finally:
        redis.stop(timeout=5.0)
        pg.stop()


async def corrupt(data_dir: Path, sql: str) -> None:
    pg = EmbeddedPostgres(data_dir)
    con = await asyncpg.connect(pg.start())
    try:
        await con.execute(sql)
    finally:
        await con.close()
        pg.stop()


async def test_verify_a_data_directory_whose_server_is_not_running(tmp_path: Path) -> None:
    data = tmp_path / "data"
    await fill(data, tmp_path / "redis")

    clean = verify(data)
    assert clean.returncode == 0, clean.stderr
    # With no starting balance, a user whose only request was refused has no row.
    users = len(USERS) - 1
    assert f"verified {users} users and 2 allowances: all checks pass" in clean.stdout

    await corrupt(data, "UPDATE ledger SET amount = amount - 1 WHERE user_id = 'u07' AND seq = 1")
    broken = verify(data, "--json")
    assert broken.returncode == 1, broken.stderr
    report = json.loads(broken.stdout)
    assert report["ok"] is False and report["users"] == users
    assert {(v["entity"], v["check"]) for v in report["violations"]} == {
        ("u07", "ledger_sum"),
        ("u07", "ledger_journal"),
    }


def test_verify_a_data_directory_that_is_not_there(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    result = verify(missing)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().startswith(f"loadout verify: no data directory {missing}: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not missing.exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    result = verify(empty, "--json")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().startswith(f"loadout verify: no database in {empty} and no")
    assert list(empty.iterdir()) == []
