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
import logging
import os
import re
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from protocol.messages import MAX_GEMS, Role
from server import cli_orders, cluster_cli
from server.cli_admin import AdminError, admin_request
from server.cli_catalog import add_catalog_commands
from server.cli_database import NoDatabase, database
from server.config import ENVIRONMENT, ConfigError, NoSecret, Settings, environment_help

if TYPE_CHECKING:
    from protocol.messages import Grant
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
        secret = settings.with_secret(create=False).secret
    except NoSecret as exc:
        print(f"loadout token: {exc}", file=sys.stderr)
        return 1
    try:
        print(issue_token(secret, args.user, Role(args.role), args.ttl))
    except ValueError as exc:
        print(f"loadout token: {exc}", file=sys.stderr)
        return 2
    return 0


#: What a grant's field must be, in the words of the command line.
_GRANT_FIELDS = {
    "user": "user ids are 1-64 characters of A-Z a-z 0-9 _ . -",
    "amount": f"amount must be a whole number of gems, from 1 to {MAX_GEMS}",
    "key": "--key must be 1-64 characters (no NUL)",
    "reason": "--reason must be at most 256 characters",
}


class _InputError(Exception):
    """A command-line argument Loadout cannot use; the message says why."""


def _grant_request(args: argparse.Namespace) -> Grant:
    """The ``grant`` request of the arguments, or ``_InputError`` saying which
    argument is wrong (not msgspec's ``Expected int >= 1 - at $.amount``)."""
    import msgspec

    from protocol.messages import Grant

    try:
        amount = int(args.amount)
    except ValueError:
        raise _InputError(_GRANT_FIELDS["amount"]) from None
    try:
        # ``convert`` checks the ranges of the type (a ``Grant(...)`` call does not).
        fields = {"rid": 1, "user": args.user, "amount": amount, "key": args.key}
        return msgspec.convert({**fields, "reason": args.reason}, Grant)
    except msgspec.ValidationError as exc:
        field = re.search(r"\$\.(\w+)", str(exc))
        raise _InputError(_GRANT_FIELDS.get(field[1] if field else "", str(exc))) from None


async def _grant(settings: Settings, args: argparse.Namespace) -> int:
    import msgspec

    try:
        grant = _grant_request(args)
    except _InputError as exc:
        print(f"loadout grant: {exc}", file=sys.stderr)
        return 2
    try:
        reply = await admin_request(settings, args.url, grant)
    except AdminError as exc:
        print(f"loadout grant: {exc}", file=sys.stderr)
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

    try:
        async with database(settings, read_only=True) as (pool, _), pool.acquire() as con:
            report = await verify(con)
    except NoDatabase as exc:
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
        prog="loadout",
        description="Loadout: a real-time game-commerce server.",
        epilog="`loadout COMMAND --help` lists a command's options and environment variables.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the server",
        description="Run the server. With nothing configured it starts its own PostgreSQL,"
        " Redis and Ray under the data directory, which it creates (the only command that"
        " does).",
        **_reads(*ENVIRONMENT),
    )
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
    token = commands.add_parser(
        "token",
        help="print a signed token",
        description="Print a token signed with the server's secret (LOADOUT_SECRET, else the"
        " one `loadout serve` generated in the data directory).",
        **_reads("LOADOUT_DATA_DIR", "LOADOUT_SECRET"),
    )
    token.add_argument("user", help="the user id (1-64 characters of A-Z a-z 0-9 _ . -)")
    token.add_argument("--role", choices=[r.value for r in Role], default=Role.PLAYER.value)
    token.add_argument("--ttl", type=int, default=3600, help="seconds (default 3600)")
    token.set_defaults(run=_cmd_token)
    add_catalog_commands(commands)
    grant = commands.add_parser(
        "grant",
        help="grant gems through the running server",
        description="Grant gems to a user through the running server, as an admin;"
        " idempotent by user and key. Prints the server's reply as JSON.",
        **_reads("LOADOUT_HOST", "LOADOUT_PORT", "LOADOUT_DATA_DIR", "LOADOUT_SECRET"),
    )
    grant.add_argument("user", help="the user to credit")
    grant.add_argument("amount", help="gems, a whole number of at least 1")
    grant.add_argument("--key", required=True, help="idempotency key")
    grant.add_argument("--reason", default="", help="recorded with the grant")
    grant.add_argument("--url", help="server URL (default from LOADOUT_HOST/LOADOUT_PORT)")
    grant.set_defaults(run=_cmd_grant)
    verify = commands.add_parser(
        "verify",
        help="check the database against itself (offline)",
        description=_VERIFY_HELP,
        **_reads("LOADOUT_DATA_DIR", "LOADOUT_DATABASE_URL"),
    )
    verify.add_argument(
        "--json",
        action="store_true",
        help='the report as {"ok", "users", "allowances", "violations": [{"entity", "check",'
        ' "detail"}]}',
    )
    verify.set_defaults(run=_cmd_verify)
    cli_orders.register(commands)
    cluster_cli.register(commands)
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


def _reads(*names: str) -> dict[str, Any]:
    """``add_parser`` arguments for a command that reads the variables ``names``
    (and, as every command does, ``LOADOUT_LOG_LEVEL``)."""
    listed = dict.fromkeys((*names, "LOADOUT_LOG_LEVEL"))
    return {
        "epilog": environment_help(*listed),
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


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
