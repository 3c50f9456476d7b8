"""The operators' fulfillment commands (PROTOCOL.md §12): ``loadout orders``
reads the orders from the database; ``loadout refund``, ``loadout order
retry`` and ``loadout order ship`` are admin requests to the running server,
as ``loadout grant`` is."""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import textwrap
from typing import TYPE_CHECKING, Any

from protocol.money import OrderStatus
from server.cli_admin import AdminError, admin_request
from server.cli_database import NoDatabase, database
from server.config import Settings, environment_help

if TYPE_CHECKING:
    import asyncpg

__all__ = ["register"]

#: The variables of a command that talks to the running server.
_SERVER_ENV = ("LOADOUT_HOST", "LOADOUT_PORT", "LOADOUT_DATA_DIR", "LOADOUT_SECRET")

#: What a request's field must be, in the words of the command line.
_FIELDS = {
    "user": "user ids are 1-64 characters of A-Z a-z 0-9 _ . -",
    "purchase": "purchase ids are 1-64 characters",
    "order": "order ids are 1-64 characters",
    "key": "--key must be 1-64 characters (no NUL)",
    "reason": "--reason must be at most 256 characters",
    "carrier": "--carrier must be 1-64 characters (no NUL)",
    "number": "--number must be 1-128 characters (no NUL)",
    "url": "--url must be an http:// or https:// address of at most 512 characters",
}

_ORDERS_HELP = """\
List orders, newest first: each order's user, item, delivery, status,
attempts, voucher code or tracking, last error and when it was created.

Reads the orders table of LOADOUT_DATABASE_URL; else of the server running on
LOADOUT_DATA_DIR; else of the embedded PostgreSQL in LOADOUT_DATA_DIR, started
for the command and stopped after. Changes nothing.
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``orders``, ``refund`` and ``order retry|ship`` under ``commands``."""
    orders = commands.add_parser(
        "orders",
        help="list orders (newest first)",
        description=_ORDERS_HELP,
        **_reads("LOADOUT_DATA_DIR", "LOADOUT_DATABASE_URL"),
    )
    orders.add_argument("--user", help="only this user's orders")
    orders.add_argument(
        "--status", choices=[s.value for s in OrderStatus], help="only orders in this status"
    )
    orders.add_argument(
        "--limit", type=_limit, default=50, metavar="N", help="at most N orders (default 50)"
    )
    orders.add_argument(
        "--json",
        action="store_true",
        help='the orders as {"orders": [{"order", "user", "purchase", "sku", "delivery",'
        ' "status", "attempts", "voucher", "tracking", "last_error", "created_at",'
        ' "updated_at"}]} (times in Unix milliseconds)',
    )
    orders.set_defaults(run=_cmd_orders)

    refund = commands.add_parser(
        "refund",
        help="refund a purchase through the running server",
        description=_wrap(
            "Refund a purchase through the running server, as an admin: the gems"
            " come back, the purchased items leave the inventory and every loadout, an unshipped"
            " order is cancelled. Refused (not_refundable) when the items are no longer all held."
            " Idempotent by key. Prints the server's reply as JSON."
        ),
        **_reads(*_SERVER_ENV),
    )
    refund.add_argument("user", help="the user who made the purchase")
    refund.add_argument("purchase", help="the purchase id (pur_...)")
    refund.add_argument("--key", required=True, help="idempotency key")
    refund.add_argument("--reason", required=True, help="recorded with the refund")
    refund.add_argument(
        "--url", "--server", dest="server", help="server URL (default from LOADOUT_HOST/PORT)"
    )
    refund.set_defaults(run=_cmd_refund)

    order = commands.add_parser("order", help="move an order on by hand")
    order_commands = order.add_subparsers(dest="order_command", required=True)
    retry = order_commands.add_parser(
        "retry",
        help="put a failed order back to pending",
        description=_wrap(
            "Put a failed order back to pending through the running server, as an"
            " admin, for the fulfillment worker to try again. Prints the server's reply as JSON."
        ),
        **_reads(*_SERVER_ENV),
    )
    retry.add_argument("order", help="the order id (ord_...)")
    retry.add_argument("--server", help="server URL (default from LOADOUT_HOST/PORT)")
    retry.set_defaults(run=_cmd_retry)
    ship = order_commands.add_parser(
        "ship",
        help="mark a physical order shipped",
        description=_wrap(
            "Mark a physical order shipped, with its tracking, through the running"
            " server, as an admin (for installs with no shop configured). Its user is told"
            " (fulfillment push). Prints the server's reply as JSON."
        ),
        **_reads(*_SERVER_ENV),
    )
    ship.add_argument("order", help="the order id (ord_...)")
    ship.add_argument("--carrier", required=True, help="the carrier, e.g. UPS")
    ship.add_argument("--number", required=True, help="the tracking number")
    ship.add_argument("--url", help="the tracking page, http(s)://...")
    ship.add_argument("--server", help="server URL (default from LOADOUT_HOST/PORT)")
    ship.set_defaults(run=_cmd_ship)


def _wrap(text: str) -> str:
    return textwrap.fill(text, 79)


def _reads(*names: str) -> dict[str, Any]:
    return {
        "epilog": environment_help(*names, "LOADOUT_LOG_LEVEL"),
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 10000, not {text!r}")
    return value


# ------------------------------------------------------------------- orders


async def _read_orders(settings: Settings, args: argparse.Namespace) -> list[asyncpg.Record]:
    from persistence.orders import orders_report

    async with database(settings, read_only=True) as (pool, _):
        return await orders_report(pool, args.user, args.status, args.limit)


def _cmd_orders(settings: Settings, args: argparse.Namespace) -> int:
    import json

    import asyncpg
    import msgspec

    from persistence.embedded import EmbeddedError

    try:
        rows = asyncio.run(_read_orders(settings, args))
    except NoDatabase as exc:
        print(f"loadout orders: {exc}", file=sys.stderr)
        return 1
    except asyncpg.UndefinedTableError as exc:
        print(f"loadout orders: not a Loadout database, or not migrated yet: {exc}",
              file=sys.stderr)  # fmt: skip
        return 1
    except (OSError, asyncpg.PostgresError, EmbeddedError) as exc:
        print(f"loadout orders: cannot read the database: {exc}", file=sys.stderr)
        return 1
    orders = [
        {
            "order": r["order_id"],
            "user": r["user_id"],
            "purchase": r["purchase"],
            "sku": r["sku"],
            "delivery": r["delivery"],
            "status": r["status"],
            "attempts": r["attempts"],
            "voucher": r["voucher"],
            "tracking": None if r["tracking"] is None else json.loads(r["tracking"]),
            "last_error": r["last_error"],
            "created_at": r["created_at"],
            "updated_at": r["updated_at"],
        }
        for r in rows
    ]
    if args.json:
        print(msgspec.json.encode({"orders": orders}).decode())
    else:
        _print_orders(orders)
    return 0


def _print_orders(orders: list[dict[str, Any]]) -> None:
    from datetime import UTC, datetime

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{len(orders)} orders, newest first", title_justify="left")
    named = ("order", "user", "purchase", "sku", "delivery", "status")
    for column in named:
        table.add_column(column, no_wrap=True)
    table.add_column("attempts", justify="right")
    for column in ("voucher/tracking", "last_error", "created"):
        table.add_column(column, no_wrap=column == "created")
    for o in orders:
        tracking = o["tracking"]
        sent = o["voucher"] or ""
        if tracking is not None:
            sent = " ".join(filter(None, (tracking["carrier"], tracking["number"],
                                          tracking.get("url"))))  # fmt: skip
        created = datetime.fromtimestamp(o["created_at"] / 1000, UTC)
        table.add_row(
            *(
                escape(str(o[k]))
                for k in ("order", "user", "purchase", "sku", "delivery", "status")
            ),
            str(o["attempts"]),
            escape(sent),
            escape(o["last_error"] or ""),
            f"{created:%Y-%m-%d %H:%M:%SZ}",
        )
    # Wide when piped, so that scripts and logs get whole lines.
    console = Console(width=None if sys.stdout.isatty() else 250, highlight=False)
    console.print(table)


# --------------------------------------------------- admin requests by hand


class _InputError(Exception):
    """A command-line argument Loadout cannot use; the message says why."""


def _request(kind: type[Any], fields: dict[str, Any]) -> Any:
    """The request ``kind`` of ``fields``, or ``_InputError`` saying which
    argument is wrong (not msgspec's ``Expected str ... - at $.key``)."""
    import msgspec

    try:
        # ``convert`` checks the constraints of the type (a constructor does not).
        return msgspec.convert({"rid": 1, **fields}, kind)
    except msgspec.ValidationError as exc:
        field = re.search(r"\$\.(\w+)", str(exc))
        raise _InputError(_FIELDS.get(field[1] if field else "", str(exc))) from None


async def _admin(
    settings: Settings, command: str, server: str | None, request: Any, success: str
) -> int:
    """Send ``request``; print a ``success`` reply as JSON, anything else as
    one line on stderr."""
    import msgspec

    try:
        reply = await admin_request(settings, server, request)
    except AdminError as exc:
        print(f"loadout {command}: {exc}", file=sys.stderr)
        return 1
    if reply.get("type") != success:
        said = f"{reply.get('code', reply.get('type'))}: {reply.get('message', '')}".rstrip(": ")
        print(f"loadout {command}: {' '.join(said.split())}", file=sys.stderr)
        return 1
    print(msgspec.json.encode(reply).decode())
    return 0


def _run(
    command: str,
    settings: Settings,
    args: argparse.Namespace,
    kind: type[Any],
    fields: dict[str, Any],
) -> int:
    """Check the request's fields (exit 2 with a plain message), then send it."""
    try:
        request = _request(kind, fields)
    except _InputError as exc:
        print(f"loadout {command}: {exc}", file=sys.stderr)
        return 2
    success = "refunded" if command == "refund" else "order_updated"
    return asyncio.run(_admin(settings, command, args.server, request, success))


def _cmd_refund(settings: Settings, args: argparse.Namespace) -> int:
    from protocol.money import Refund

    fields = {"user": args.user, "purchase": args.purchase, "key": args.key, "reason": args.reason}
    return _run("refund", settings, args, Refund, fields)


def _cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    from protocol.money import RetryOrder

    return _run("order retry", settings, args, RetryOrder, {"order": args.order})


def _cmd_ship(settings: Settings, args: argparse.Namespace) -> int:
    from protocol.money import ShipOrder

    fields = {"order": args.order, "carrier": args.carrier, "number": args.number}
    return _run("order ship", settings, args, ShipOrder, {**fields, "url": args.url})
