"""Where a ``loadout`` command finds Loadout's database.

Only ``loadout serve`` makes a data directory or a database: a command run in
the wrong directory must say so, not quietly start a new embedded PostgreSQL
and publish a catalog (or check a database) that no server will ever read.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from server.config import Settings

if TYPE_CHECKING:
    import asyncpg

__all__ = ["NoDatabase", "database"]


class NoDatabase(Exception):
    """There is no database to use; the message says where none was found."""


def _missing(settings: Settings) -> NoDatabase:
    where = settings.data_dir
    if not where.is_dir():
        found = f"no data directory {where}"
    else:
        found = f"no database in {where} and no server running there"
    return NoDatabase(
        f"{found}: run this where `loadout serve` ran, or set LOADOUT_DATA_DIR"
        " or LOADOUT_DATABASE_URL"
    )


@contextlib.asynccontextmanager
async def database(
    settings: Settings, *, read_only: bool = False
) -> AsyncIterator[tuple[asyncpg.Pool, str | None]]:
    """A one-connection pool on Loadout's database, and the Redis URL of a
    server to notify (None when there is none to notify).

    The database is ``LOADOUT_DATABASE_URL``, else the running server's (its
    services file), else the data directory's embedded PostgreSQL, started
    for as long as the caller needs it; with none of these, ``NoDatabase``.
    It is migrated, unless ``read_only``."""
    import asyncpg

    from persistence.embedded import EmbeddedPostgres
    from persistence.schema import migrate
    from server.app import read_services

    running = read_services(settings.data_dir) or {}
    database_url = settings.database_url or running.get("database_url")
    redis_url = settings.redis_url or running.get("redis_url")
    started: EmbeddedPostgres | None = None
    pool = None
    try:
        if database_url:  # (with None, asyncpg would try libpq's default server)
            try:
                pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1, timeout=5)
            except (OSError, asyncpg.PostgresError):
                if settings.database_url:
                    raise
        if pool is None:
            # No server running on this data directory: use its database directly.
            if not EmbeddedPostgres.exists(settings.data_dir):
                raise _missing(settings)
            started = EmbeddedPostgres(settings.data_dir)
            pool = await asyncpg.create_pool(started.start(), min_size=1, max_size=1)
            redis_url = None
        if not read_only:
            await migrate(pool)
        yield pool, redis_url
    finally:
        if pool is not None:
            await pool.close()
        if started is not None:
            started.stop()
