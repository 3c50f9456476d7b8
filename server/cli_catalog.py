"""``loadout catalog load`` and ``loadout catalog show`` (docs/catalog.md)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from server.cli_database import NoDatabase, database
from server.config import Settings, environment_help

if TYPE_CHECKING:
    from actors.catalog import Catalog
    from protocol.messages import CatalogItem

__all__ = ["add_catalog_commands"]


def add_catalog_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``catalog load`` and ``catalog show`` under ``commands``."""
    catalog = commands.add_parser("catalog", help="catalog commands")
    catalog_commands = catalog.add_subparsers(dest="catalog_command", required=True)
    load = catalog_commands.add_parser(
        "load",
        help="validate and publish a catalog file",
        description="Validate a catalog file (docs/catalog.md) and publish it as the next"
        " catalog version; running servers tell their clients (catalog_changed).",
        epilog=environment_help(
            "LOADOUT_DATA_DIR", "LOADOUT_DATABASE_URL", "LOADOUT_REDIS_URL", "LOADOUT_LOG_LEVEL"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    load.add_argument("file", help="the catalog, TOML")
    load.add_argument(
        "--allow-empty",
        action="store_true",
        help="publish a catalog with no items (an empty store)",
    )
    load.set_defaults(run=_cmd_catalog_load)
    show = catalog_commands.add_parser(
        "show",
        help="print the live catalog",
        description="Print the newest published catalog as clients see it now.",
        epilog=environment_help("LOADOUT_DATA_DIR", "LOADOUT_DATABASE_URL", "LOADOUT_LOG_LEVEL"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("--game", help="only this game's items and the platform-wide ones")
    show.add_argument("--json", action="store_true", help="the items as clients see them now")
    show.set_defaults(run=_cmd_catalog_show)


async def _publish(settings: Settings, text: str, source: str) -> int:
    import redis.asyncio as aioredis

    from actors.catalog_source import publish_catalog_text
    from actors.routing import catalog_channel

    async with database(settings) as (pool, redis_url):
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
        document = parse_catalog(text)
    except OSError as exc:
        print(f"loadout catalog load: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 2
    except CatalogFileError as exc:
        print(f"loadout catalog load: {path}: {exc}; nothing was published", file=sys.stderr)
        return 1
    if not document.items and not args.allow_empty:
        # An empty store is almost always the wrong file; publishing it would
        # take every item off sale at once.
        print(
            f"loadout catalog load: {path} has no items; nothing was published"
            " (--allow-empty publishes an empty store)",
            file=sys.stderr,
        )
        return 1
    try:
        return asyncio.run(_publish(settings, text, str(path.name)))
    except NoDatabase as exc:
        print(f"loadout catalog load: {exc}", file=sys.stderr)
        return 1


async def _live_catalog(settings: Settings) -> Catalog:
    from actors.catalog_source import load_live_catalog

    async with database(settings) as (pool, _):
        return await load_live_catalog(pool)


def _cmd_catalog_show(settings: Settings, args: argparse.Namespace) -> int:
    import msgspec

    try:
        catalog = asyncio.run(_live_catalog(settings))
    except NoDatabase as exc:
        print(f"loadout catalog show: {exc}", file=sys.stderr)
        return 1
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
