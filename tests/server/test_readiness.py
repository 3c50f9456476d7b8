"""Readiness (server/readiness.py) against a real PostgreSQL and a Redis that
is not there: /readyz names what is down, and the gauge follows."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis

from persistence.embedded import EmbeddedPostgres
from persistence.store import open_pool
from server.metrics import Metrics
from server.readiness import Readiness
from tests.e2e.support import free_port


@dataclass
class Batcher:
    shard: int
    linked: bool


@pytest.fixture(scope="module")
def dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedPostgres(tmp_path_factory.mktemp("readiness"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await open_pool(dsn)
    try:
        yield pool
    finally:
        await pool.close()


async def test_readyz_names_every_dependency_that_is_down(
    pool: asyncpg.Pool, redis_url: str, tmp_path: Path
) -> None:
    metrics = Metrics()
    shards = [Batcher(0, True), Batcher(1, True)]
    up = aioredis.from_url(redis_url)
    readiness = Readiness(pool, up, shards, metrics)
    await readiness.start()
    try:
        ready, body = readiness.body()
        assert ready and msgspec.json.decode(body)["down"] == []
        shards[1].linked = False
        ready, body = readiness.body()
        assert not ready and msgspec.json.decode(body)["down"] == ["shard 1"]
    finally:
        await readiness.close()
        await up.aclose()

    nowhere = aioredis.from_url(f"redis://127.0.0.1:{free_port()}")
    readiness = Readiness(pool, nowhere, shards, metrics)
    await readiness.start()
    try:
        ready, body = readiness.body()
        report = msgspec.json.decode(body)
        assert not ready and report["down"] == ["redis", "shard 1"]
        assert report["dependencies"]["postgresql"] == "up"
        rendered = metrics.render().decode()
        assert 'loadout_dependency_up{dependency="redis"} 0.0' in rendered
        assert 'loadout_dependency_up{dependency="postgresql"} 1.0' in rendered
    finally:
        await readiness.close()
        await nowhere.aclose()
