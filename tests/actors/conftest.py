"""Fixtures for the shard host's tests: one embedded PostgreSQL and Redis for
the session, and hosts on shard numbers of their own (each its own epoch)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

import asyncpg
import msgspec
import pytest

from actors.catalog import demo_catalog_text
from actors.catalog_source import publish_catalog_text
from actors.shard.coordinator import StepCaller
from actors.shard.host import ShardHost, ShardSettings
from actors.shard.records import BatchItem
from persistence.embedded import EmbeddedPostgres, EmbeddedRedis
from persistence.schema import migrate
from persistence.store import open_pool

_shards = itertools.count(100)
_decoder = msgspec.msgpack.Decoder()


@pytest.fixture(scope="session")
def pg_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedPostgres(tmp_path_factory.mktemp("host-pg"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def session_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("host-redis"))
    try:
        yield server.start()
    finally:
        server.stop(timeout=5.0)


@pytest.fixture(scope="session")
async def db(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """The migrated database with the demo catalog live."""
    pool = await open_pool(pg_dsn)
    try:
        await migrate(pool)
        await publish_catalog_text(pool, demo_catalog_text(), "demo", only_if_none=True)
        yield pool
    finally:
        await pool.close()


class HostFactory(Protocol):
    def __call__(
        self, *, shard: int | None = None, call: StepCaller | None = None, **settings: Any
    ) -> AbstractAsyncContextManager[ShardHost]: ...


@pytest.fixture
def hosts(db: asyncpg.Pool, pg_dsn: str, session_redis: str) -> HostFactory:
    """Start a host (on a new shard number unless one is given); closed after."""

    @asynccontextmanager
    async def make(
        *, shard: int | None = None, call: StepCaller | None = None, **settings: Any
    ) -> AsyncIterator[ShardHost]:
        number = next(_shards) if shard is None else shard
        host = ShardHost(
            ShardSettings(shard=number, database_url=pg_dsn, redis_url=session_redis, **settings),
            call,
        )
        await host.start()
        try:
            yield host
        finally:
            await host.close()

    return make


def fresh_shard() -> int:
    return next(_shards)


async def apply(host: ShardHost, batch: list[BatchItem]) -> list[dict[str, Any]]:
    """Apply a batch as a gateway would; the decoded replies."""
    replies = await host.apply_batch(host.catalog.version, batch)
    return [_decoder.decode(r) for r in replies]


def kinds(replies: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for reply in replies:
        kind = reply["type"] if reply["type"] != "error" else "error:" + reply["code"]
        out[kind] = out.get(kind, 0) + 1
    return out


async def durable(pool: asyncpg.Pool, user: str) -> dict[str, Any]:
    """What the database holds of a user: row, journal versions and keys, ledger."""
    row = await pool.fetchrow("SELECT version, balance FROM users WHERE user_id = $1", user)
    journal = await pool.fetch(
        "SELECT version, key FROM journal WHERE user_id = $1 ORDER BY version", user
    )
    ledger = await pool.fetchval(
        "SELECT coalesce(sum(amount), 0) FROM ledger WHERE user_id = $1", user
    )
    return {
        "version": None if row is None else row["version"],
        "balance": None if row is None else row["balance"],
        "versions": [r["version"] for r in journal],
        "keys": [r["key"] for r in journal if r["key"] is not None],
        "ledger": ledger,
    }
