"""The shard actor's own start-up (actors/shard/actor.py), without Ray: the
class is a plain object until ``ray.remote`` wraps it."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

import actors.shard.actor as actormod
from actors.shard.actor import ShardActor
from actors.shard.host import ShardSettings
from persistence import store
from tests.actors.conftest import fresh_shard


def flaky_pool(monkeypatch: pytest.MonkeyPatch, failures: int) -> list[int]:
    """``open_pool`` fails its first ``failures`` calls (the database not up yet)."""
    calls: list[int] = []
    real = store.open_pool

    async def open_pool(*args: Any, **kwargs: Any) -> asyncpg.Pool:
        calls.append(1)
        if len(calls) <= failures:
            raise ConnectionRefusedError("database not up yet")
        return await real(*args, **kwargs)

    monkeypatch.setattr(store, "open_pool", open_pool)
    monkeypatch.setattr(actormod, "START_BACKOFF", 0.01)
    return calls


def actor(pg_dsn: str, session_redis: str) -> ShardActor:
    return ShardActor(
        ShardSettings(shard=fresh_shard(), database_url=pg_dsn, redis_url=session_redis)
    )


async def test_a_first_start_that_fails_is_retried(
    db: asyncpg.Pool, pg_dsn: str, session_redis: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue exactly-once, 6): a shard whose first start failed
    kept the failed start and never started, and Ray did not restart it."""
    calls = flaky_pool(monkeypatch, failures=2)
    shard = actor(pg_dsn, session_redis)
    try:
        stats = await shard.start()
        assert stats["epoch"] >= 1 and len(calls) == 3
    finally:
        await shard.close()


async def test_when_every_attempt_fails_the_next_call_starts_again(
    db: asyncpg.Pool, pg_dsn: str, session_redis: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = flaky_pool(monkeypatch, failures=actormod.START_ATTEMPTS)
    shard = actor(pg_dsn, session_redis)
    try:
        with pytest.raises(ConnectionRefusedError):
            await shard.start()
        assert len(calls) == actormod.START_ATTEMPTS
        stats = await shard.stats()  # the database is up now
        assert stats["epoch"] >= 1
    finally:
        await shard.close()
