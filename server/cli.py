"""The ``loadout`` command (PROTOCOL.md §8).

Commands that are not the server's own come from the ``loadout.commands``
entry-point group: each entry names a ``register(commands)`` that adds its
subparser to ``commands`` and sets ``run`` on it, a ``(Settings, Namespace)
-> int`` like the commands here.  ``loadout bench`` arrives this way, so that
the benchmark can use the server while nothing in the server imports the
benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

from protocol.messages import Role
from server.config import ConfigError, Settings

if TYPE_CHECKING:
    import asyncpg

    from actors.catalog import Catalog
    from protocol.messages import CatalogItem
    from server.verify import Report

__all__ = ["COMMANDS_GROUP", "main"]

#: The entry-point group of the commands other packages add to ``loadout``.
COMMANDS_GROUP = "loadout.commands"

log = logging.getLogger("loadout.cli")


def _cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from server.app import run_server
    from server.supervision import DataDirInUse
    from server.workers import worker_settings

    try:
        if args.worker:
            settings = worker_settings(settings)
        run_server(settings, workers=args.workers)
    except (DataDirInUse, ConfigError) as exc:
        print(f"loadout serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    from server.auth import issue_token

    try:
        print(issue_token(settings.with_secret().secret, args.user, Role(args.role), args.ttl))
    except ValueError as exc:
        print(f"loadout token: {exc}", file=sys.stderr)
        return 2
    return 0


class _NoDatabase(Exception):
    """The data directory has no database (and the caller may not create one)."""


@contextlib.asynccontextmanager
async def _database(
    settings: Settings, *, read_only: bool = False
) -> AsyncIterator[tuple[asyncpg.Pool, str | None]]:
    """A one-connection pool on Loadout's database, and the Redis URL of a
    server to notify (None when there is none to notify).

    The database is ``LOADOUT_DATABASE_URL``, else the running server's (its
    services file), else the data directory's embedded PostgreSQL, started
    for as long as the caller needs it.  It is migrated, unless ``read_only``:
    then neither its schema nor a new cluster is made (``_NoDatabase``)."""
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
            if read_only and not EmbeddedPostgres.exists(settings.data_dir):
                raise _NoDatabase(f"no database in {settings.data_dir}") from None
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


async def _publish(settings: Settings, text: str, source: str) -> int:
    import redis.asyncio as aioredis

    from actors.catalog_source import publish_catalog_text
    from actors.routing import catalog_channel

    async with _database(settings) as (pool, redis_url):
        version = await publish_catalog_text(pool, text, source)
        assert version is not None
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


async def _live_catalog(settings: Settings) -> Catalog:
    from actors.catalog_source import load_live_catalog

    async with _database(settings) as (pool, _):
        return await load_live_catalog(pool)


def _cmd_catalog_show(settings: Settings, args: argparse.Namespace) -> int:
    import msgspec

    catalog = asyncio.run(_live_catalog(settings))
    if catalog.version == 0:
        print("loadout catalog show: no catalog has been published", file=sys.stderr)
        return 1
    if args.game is not None and args.game not in catalog.games:
        print(
            f"loadout catalog show: no game {args.game!r} in catalog version {catalog.version}",
            file=sys.stderr,
        )
        return 1
    now = time.time_ns() // 1_000_000
    # As the ``catalog`` request lists them: with a game, its items and the
    # platform-wide ones (PROTOCOL.md §3).
    items = [
        catalog.wire(item, now)
        for sku, item in sorted(catalog.items.items())
        if args.game is None or item.game in (None, args.game)
    ]
    if args.json:
        print(msgspec.json.encode({"version": catalog.version, "items": items}).decode())
    else:
        _print_catalog_table(catalog.version, args.game, items)
    return 0


def _print_catalog_table(version: int, game: str | None, items: list[CatalogItem]) -> None:
    from datetime import UTC, datetime

    from rich.console import Console
    from rich.table import Table

    def when(ms: int | None) -> str:
        return "" if ms is None else f"{datetime.fromtimestamp(ms / 1000, UTC):%Y-%m-%d %H:%MZ}"

    title = f"catalog version {version}" + (f", game {game}" if game else "")
    table = Table(title=title, title_justify="left")
    for column in ("sku", "name", "game", "category", "kind"):
        table.add_column(column, no_wrap=column == "sku")
    for column in ("price now", "base price"):
        table.add_column(column, justify="right")
    for column in ("sale ends", "bundle", "limit", "duration", "status"):
        table.add_column(column)
    for item in items:
        bundle = ""
        if item.bundle is not None:
            bundle = ", ".join(f"{line.quantity} x {line.sku}" for line in item.bundle)
            if item.bundle_gems:
                bundle += f", {item.bundle_gems} gems"
        limit = item.limit
        table.add_row(
            item.sku,
            item.name,
            item.game or "(all)",
            item.category,
            item.kind.value,
            str(item.price),
            str(item.base_price),
            when(item.sale_ends_at),
            bundle,
            f"{limit.count} per {_duration_text(limit.per_seconds)}" if limit else "",
            _duration_text(item.duration_seconds) if item.duration_seconds else "",
            item.status.value,
        )
    # Wide when piped, so that scripts and logs get whole lines.
    console = Console(width=None if sys.stdout.isatty() else 250, highlight=False)
    console.print(table)


def _duration_text(seconds: int) -> str:
    """A catalog duration back in the file's words: 86400 -> "1d"."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


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


_VERIFY_HELP = """\
Check the database against itself, offline, and report every violation:
  - a user's balance is the sum of its ledger amounts, and not negative;
  - each entity's journal versions run 1..N with no gap, its state row is at N,
    and replaying the journal gives the row's balance and state;
  - an idempotency key is used at most once per user; every ledger row is the
    ledger entry of the journal change of its seq;
  - per reservation of a limited item or promo code: reserved = confirmed +
    released or abandoned + still held, each ended once; used = sum confirmed;
    none recorded as sold was released.

Reads the tables users, journal, ledger and reservation_outcomes, in one
read-only snapshot, of LOADOUT_DATABASE_URL; else of the server running on
LOADOUT_DATA_DIR; else of the embedded PostgreSQL in LOADOUT_DATA_DIR, started
for the check and stopped after. Changes no data, and makes no data directory
or database.

Exit status: 0 all checks pass, 1 violations found, 2 nothing could be checked.
"""


async def _run_verify(settings: Settings, as_json: bool) -> int:
    import asyncpg
    import msgspec

    from persistence.embedded import EmbeddedError
    from server.verify import verify

    if settings.database_url is None and not settings.data_dir.is_dir():
        print(f"loadout verify: no data directory {settings.data_dir}", file=sys.stderr)
        return 2
    try:
        async with _database(settings, read_only=True) as (pool, _), pool.acquire() as con:
            report = await verify(con)
    except _NoDatabase as exc:
        print(f"loadout verify: {exc}", file=sys.stderr)
        return 2
    except asyncpg.UndefinedTableError as exc:
        print(
            f"loadout verify: not a Loadout database, or not migrated yet: {exc}", file=sys.stderr
        )
        return 2
    except (OSError, asyncpg.PostgresError, EmbeddedError) as exc:
        print(f"loadout verify: cannot read the database: {exc}", file=sys.stderr)
        return 2
    if as_json:
        print(msgspec.json.encode(report).decode())
    else:
        _print_verify_report(report)
    return 0 if report.ok else 1


def _cmd_verify(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_run_verify(settings, args.json))


#: Violations the table shows; ``--json`` lists them all.
_SHOWN_VIOLATIONS = 100


def _print_verify_report(report: Report) -> None:
    from collections import Counter

    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 250, highlight=False)
    checked = f"{report.users} users and {report.allowances} allowances"
    if report.ok:
        console.print(f"[green]verified {checked}: all checks pass[/green]")
        return
    by_check = Counter(v.check.value for v in report.violations)
    counts = ", ".join(f"{check} {n}" for check, n in sorted(by_check.items()))
    console.print(f"[red]verified {checked}: {len(report.violations)} violations[/red] ({counts})")
    table = Table()
    for column in ("entity", "check", "detail"):
        table.add_column(column, no_wrap=column != "detail")
    for violation in report.violations[:_SHOWN_VIOLATIONS]:
        table.add_row(violation.entity, violation.check.value, violation.detail)
    console.print(table)
    if len(report.violations) > _SHOWN_VIOLATIONS:
        more = len(report.violations) - _SHOWN_VIOLATIONS
        console.print(f"... and {more} more (--json lists every violation)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 256:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 256, not {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loadout", description="Loadout: a real-time game-commerce server."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument(
        "--workers",
        type=_positive,
        default=1,
        metavar="N",
        help="gateway processes serving the same ports, sharing the shards (default 1)",
    )
    # A gateway worker that a ``serve --workers`` started (server/workers.py).
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
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
    show = catalog_commands.add_parser("show", help="print the live catalog")
    show.add_argument("--game", help="only this game's items and the platform-wide ones")
    show.add_argument("--json", action="store_true", help="the items as clients see them now")
    show.set_defaults(run=_cmd_catalog_show)
    grant = commands.add_parser("grant", help="grant gems through the running server")
    grant.add_argument("user")
    grant.add_argument("amount", type=int)
    grant.add_argument("--key", required=True, help="idempotency key")
    grant.add_argument("--reason", default="", help="recorded with the grant")
    grant.add_argument("--url", help="server URL (default from LOADOUT_HOST/LOADOUT_PORT)")
    grant.set_defaults(run=_cmd_grant)
    verify = commands.add_parser(
        "verify",
        help="check the database against itself (offline)",
        description=_VERIFY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument(
        "--json",
        action="store_true",
        help='the report as {"ok", "users", "allowances", "violations": [{"entity", "check",'
        ' "detail"}]}',
    )
    verify.set_defaults(run=_cmd_verify)
    for entry in entry_points(group=COMMANDS_GROUP):
        try:
            register = entry.load()
        except ImportError as exc:
            # A command whose package is broken or half-installed must not
            # take ``loadout serve`` down with it.
            print(f"loadout: no {entry.name!r} command: {exc}", file=sys.stderr)
            continue
        register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"loadout: {exc}", file=sys.stderr)
        return 2
    # Gateway processes that share one log (``serve --workers``) say which they are.
    pid = (
        "[%(process)d] "
        if getattr(args, "worker", False) or getattr(args, "workers", 1) > 1
        else ""
    )
    logging.basicConfig(
        level=settings.log_level, format=f"%(asctime)s %(levelname)s {pid}%(name)s: %(message)s"
    )
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    code: int = args.run(settings, args)
    return code


if __name__ == "__main__":
    sys.exit(main())
