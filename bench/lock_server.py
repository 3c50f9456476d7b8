"""``python -m bench.lock_server``: ``loadout serve`` with the lock baseline
(``bench/lock_core.py``) under the gateway in place of the actor core.

It reads the same environment as ``loadout serve`` (LOADOUT_PORT,
LOADOUT_DATA_DIR, LOADOUT_DATABASE_URL, ...), starts no Ray, and drains on
SIGTERM the same way.  ``loadout bench --baseline lock`` starts it on a
temporary data directory (``bench/server.py``); it is not meant for a
production database, which would get the baseline's ``lock_*`` tables.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import redis.asyncio as aioredis

from bench.lock_core import LockBackend
from server.app import CatalogHolder, Services, run_server
from server.config import ConfigError, Settings

__all__ = ["main", "start_lock_backend"]


async def start_lock_backend(
    settings: Settings, services: Services, redis: aioredis.Redis, catalog: CatalogHolder
) -> LockBackend:
    """The lock baseline on the server's database, Redis and catalog, started
    (a ``server.app.BackendFactory``)."""
    backend = LockBackend(
        services.database_url, redis, catalog.current, starting_balance=settings.starting_balance
    )
    await backend.start()
    return backend


def main(argv: Sequence[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m bench.lock_server",
        description="Serve with the row-lock baseline under the Loadout gateway "
        "(configured like loadout serve, from the environment).",
    ).parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"bench.lock_server: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run_server(settings, start_lock_backend, uses_ray=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
