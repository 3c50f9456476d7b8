"""Partitions moving between shard hosts (PROTOCOL.md §13), against
PostgreSQL: a hand-over loses nothing, and a shard the map moved a partition
away from without a hand-over can no longer write it (the journal's fence)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import asyncpg
import msgspec
import pytest

from actors.catalog import demo_catalog_text
from actors.catalog_source import publish_catalog_text
from actors.partitions import initial_owners, partition_of
from actors.shard.host import ShardHost, ShardSettings
from actors.shard.records import MOVED
from persistence import cluster
from persistence.schema import migrate
from persistence.store import open_pool
from protocol.messages import Grant, State
from tests.actors.conftest import apply, durable

PARTITIONS = 8


@pytest.fixture
async def cluster_db(pg_dsn: str) -> AsyncIterator[tuple[str, asyncpg.Pool]]:
    """A database of its own with a map: 8 partitions on shards 0 and 1."""
    name = "moves_" + secrets.token_hex(4)
    admin = await asyncpg.connect(pg_dsn)
    await admin.execute(f"CREATE DATABASE {name}")
    await admin.close()
    base, _, query = pg_dsn.partition("?")
    dsn = base.rsplit("/", 1)[0] + "/" + name + ("?" + query if query else "")
    pool = await open_pool(dsn)
    try:
        await migrate(pool)
        await publish_catalog_text(pool, demo_catalog_text(), "demo", only_if_none=True)
        await cluster.agree(pool, {"partitions": str(PARTITIONS)}, initial_owners(PARTITIONS, 2))
        yield dsn, pool
    finally:
        await pool.close()


def _user_on(shard: int) -> str:
    return next(u for i in range(1000) if partition_of(u := f"mover-{i}", PARTITIONS) % 2 == shard)


async def _host(dsn: str, redis: str, shard: int) -> ShardHost:
    host = ShardHost(ShardSettings(shard=shard, database_url=dsn, redis_url=redis))
    await host.start()
    return host


async def test_a_shard_moved_away_from_without_a_hand_over_cannot_write(
    cluster_db: tuple[str, asyncpg.Pool], session_redis: str
) -> None:
    dsn, pool = cluster_db
    user = _user_on(0)
    old = await _host(dsn, session_redis, 0)
    try:
        replies = await apply(old, [(user, Grant(rid=1, user=user, amount=10, key="a"))])
        assert replies[0]["type"] == "granted"
        # The map gives the partition to shard 1 behind shard 0's back (as if
        # shard 0 were thought lost): its next write must not land.
        await cluster.move(pool, {partition_of(user, PARTITIONS): 1})
        raw = await old.apply_batch(
            old.catalog.version, [(user, Grant(rid=2, user=user, amount=5, key="b"))]
        )
        assert raw == [MOVED]  # not applied; the gateway re-routes it
        assert (await durable(pool, user))["keys"] == ["a:a"]
        new = await _host(dsn, session_redis, 1)
        try:
            replies = await apply(new, [(user, Grant(rid=3, user=user, amount=5, key="b"))])
            assert replies[0]["type"] == "granted" and replies[0]["balance"] == 15
        finally:
            await new.close()
    finally:
        await old.close()
    assert (await durable(pool, user))["balance"] == 15


async def test_a_hand_over_moves_a_user_with_everything_durable(
    cluster_db: tuple[str, asyncpg.Pool], session_redis: str
) -> None:
    dsn, pool = cluster_db
    user = _user_on(1)
    partition = partition_of(user, PARTITIONS)
    old, new = await _host(dsn, session_redis, 1), await _host(dsn, session_redis, 0)
    try:
        for n in range(5):
            await apply(old, [(user, Grant(rid=n, user=user, amount=2, key=f"k{n}"))])
        assert await old.release([partition]) == [partition]
        # Handed over: the old owner answers MOVED even before the map changes.
        assert await old.apply_batch(old.catalog.version, [(user, State(rid=9))]) == [MOVED]
        epoch = await cluster.move(pool, {partition: 0})
        # The new owner learns of the move from the epoch a gateway sends.
        (raw,) = await new.apply_batch(new.catalog.version, [(user, State(rid=11))], epoch)
        assert raw != MOVED and msgspec.msgpack.decode(raw)["balance"] == 10
        replies = await apply(new, [(user, Grant(rid=12, user=user, amount=2, key="k0"))])
        assert replies[0]["type"] == "granted" and replies[0]["balance"] == 2  # the original
        replies = await apply(new, [(user, Grant(rid=13, user=user, amount=2, key="k5"))])
        assert replies[0]["balance"] == 12
    finally:
        await old.close()
        await new.close()
