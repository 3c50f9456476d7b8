"""The ``loadout`` command (PROTOCOL.md §8)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from protocol.messages import Role
from server.config import ConfigError, Settings

__all__ = ["main"]

log = logging.getLogger("loadout.cli")


def _cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from server.app import run_server

    run_server(settings)
    return 0


def _cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    from server.auth import issue_token

    try:
        print(issue_token(settings.with_secret().secret, args.user, Role(args.role), args.ttl))
    except ValueError as exc:
        print(f"loadout token: {exc}", file=sys.stderr)
        return 2
    return 0


async def _publish(settings: Settings, text: str, source: str) -> int:
    import asyncpg
    import redis.asyncio as aioredis

    from actors.catalog_source import publish_catalog_text
    from actors.host import catalog_channel
    from persistence.embedded import EmbeddedPostgres
    from persistence.schema import migrate
    from server.app import read_services

    running = read_services(settings.data_dir) or {}
    database_url = settings.database_url or running.get("database_url")
    redis_url = settings.redis_url or running.get("redis_url")
    started: EmbeddedPostgres | None = None
    pool = None
    try:
        try:
            pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1, timeout=5)
        except (OSError, asyncpg.PostgresError):
            if settings.database_url:
                raise
            # No server running on this data directory: use its database directly.
            started = EmbeddedPostgres(settings.data_dir)
            pool = await asyncpg.create_pool(started.start(), min_size=1, max_size=1)
            redis_url = None
        await migrate(pool)
        version = await publish_catalog_text(pool, text, source)
        assert version is not None
    finally:
        if pool is not None:
            await pool.close()
        if started is not None:
            started.stop()
    print(f"published catalog version {version}")
    if redis_url:
        client = aioredis.from_url(redis_url)
        try:
            await client.publish(catalog_channel(), str(version))
        except Exception as exc:
            print(f"warning: could not notify running servers: {exc}", file=sys.stderr)
        finally:
            await client.aclose()
    return 0


def _cmd_catalog_load(settings: Settings, args: argparse.Namespace) -> int:
    from actors.catalog import CatalogFileError, parse_catalog

    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
        parse_catalog(text)
    except OSError as exc:
        print(f"loadout catalog load: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 2
    except CatalogFileError as exc:
        print(f"loadout catalog load: {path}: {exc}; nothing was published", file=sys.stderr)
        return 1
    return asyncio.run(_publish(settings, text, str(path.name)))


async def _grant(settings: Settings, args: argparse.Namespace) -> int:
    import msgspec
    from websockets.asyncio.client import connect

    from protocol.codec import codec_for
    from protocol.messages import Grant
    from server.auth import issue_token

    token = issue_token(settings.with_secret().secret, "loadout-cli", Role.ADMIN, ttl=60)
    url = args.url or f"ws://{settings.host}:{settings.port}/v1/ws"
    codec = codec_for(None)
    try:
        grant = Grant(rid=1, user=args.user, amount=args.amount, key=args.key, reason=args.reason)
    except msgspec.ValidationError as exc:
        print(f"loadout grant: {exc}", file=sys.stderr)
        return 2
    try:
        async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
            await asyncio.wait_for(ws.recv(), 10)  # welcome
            await ws.send(msgspec.json.encode(grant).decode())
            reply = codec.decode_any(await asyncio.wait_for(ws.recv(), 30))
    except (OSError, TimeoutError) as exc:
        print(f"loadout grant: cannot reach the server at {url}: {exc}", file=sys.stderr)
        return 1
    print(msgspec.json.encode(reply).decode())
    return 0 if reply.get("type") == "granted" else 1


def _cmd_grant(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_grant(settings, args))


def _cmd_bench(settings: Settings, args: argparse.Namespace) -> int:
    from bench.main import run

    return run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loadout", description="Loadout: a real-time game-commerce server."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server")
    serve.set_defaults(run=_cmd_serve)
    token = commands.add_parser("token", help="print a signed token")
    token.add_argument("user")
    token.add_argument("--role", choices=[r.value for r in Role], default=Role.PLAYER.value)
    token.add_argument("--ttl", type=int, default=3600, help="seconds (default 3600)")
    token.set_defaults(run=_cmd_token)
    catalog = commands.add_parser("catalog", help="catalog commands")
    catalog_commands = catalog.add_subparsers(dest="catalog_command", required=True)
    load = catalog_commands.add_parser("load", help="validate and publish a catalog file")
    load.add_argument("file")
    load.set_defaults(run=_cmd_catalog_load)
    grant = commands.add_parser("grant", help="grant gems through the running server")
    grant.add_argument("user")
    grant.add_argument("amount", type=int)
    grant.add_argument("--key", required=True, help="idempotency key")
    grant.add_argument("--reason", default="", help="recorded with the grant")
    grant.add_argument("--url", help="server URL (default from LOADOUT_HOST/LOADOUT_PORT)")
    grant.set_defaults(run=_cmd_grant)
    bench = commands.add_parser(
        "bench",
        help="benchmark a server (one it starts, or --url); --baseline lock compares",
        description="Drive a Loadout server with WebSocket clients and report throughput "
        "and latency (see BENCHMARKS.md).",
    )
    from bench.main import add_arguments

    add_arguments(bench)
    bench.set_defaults(run=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"loadout: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    code: int = args.run(settings, args)
    return code


if __name__ == "__main__":
    sys.exit(main())
