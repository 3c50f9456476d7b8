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


def test_shard_actors_get_no_connection_urls_in_their_arguments(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """Ray keeps an actor's arguments in its control store: the database and
    Redis URLs (passwords included) must not be among them; the actor reads
    them on its node (``connections``)."""
    import pickle

    captured: list[bytes] = []

    class Remote:
        def options(self, **options: Any) -> Remote:
            return self

        def remote(self, *args: Any) -> None:
            captured.append(pickle.dumps(args))

    monkeypatch.setattr(actormod.ray, "remote", lambda cls: Remote())
    secret_db, secret_redis = "postgresql://u:db-s3cret@h/d", "redis://:redis-s3cret@h:1"
    settings = ShardSettings(shard=0, database_url=secret_db, redis_url=secret_redis)
    services = tmp_path / "services.json"
    services.write_text(f'{{"database_url": "{secret_db}", "redis_url": "{secret_redis}"}}')
    actormod.shard_handles([settings], namespace="n", detached=True, services_file=str(services))
    assert captured and all(b"s3cret" not in args for args in captured)
    # The actor finds them again on its node: the environment, else the file.
    args = pickle.loads(captured[0])
    found = actormod.connections(args[0], args[2])
    assert (found.database_url, found.redis_url) == (secret_db, secret_redis)
    monkeypatch.setenv("LOADOUT_DATABASE_URL", "postgresql://from-env")
    assert actormod.connections(args[0], args[2]).database_url == "postgresql://from-env"
    monkeypatch.delenv("LOADOUT_DATABASE_URL")
    with pytest.raises(RuntimeError, match="LOADOUT_DATABASE_URL is not set"):
        actormod.connections(args[0], None)
