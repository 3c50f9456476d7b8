"""``loadout verify`` against a real PostgreSQL: a database written by a real
shard host passes; each kind of corruption, made with SQL in a copy of it,
is reported under its check, naming its entity, with exit status 1."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec
import pytest

from actors.catalog import demo_catalog_text
from actors.catalog_source import publish_catalog_text
from actors.saga import SagaStep, Step
from actors.shard.host import ShardHost, ShardSettings
from actors.shard.records import BatchItem
from actors.shard.residents import allowance_decoder, allowance_encoder
from persistence.embedded import EmbeddedPostgres, EmbeddedRedis
from persistence.schema import migrate
from protocol.messages import Consume, CreateProfile, Equip, Grant, Purchase, Redeem
from server import cli
from server.config import Settings
from server.verify import Check, Report, verify

STOCK = "stock:br.rifle.founders"
PROMO = "promo:WELCOME-2026"
USERS = [f"u{i:02}" for i in range(12)]
RICH, POOR = USERS[:10], USERS[10:]
_decoder = msgspec.msgpack.Decoder()
_databases = itertools.count()


@pytest.fixture(scope="module")
def pg_admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedPostgres(tmp_path_factory.mktemp("verify-pg"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("verify-redis"))
    try:
        yield server.start()
    finally:
        server.stop(timeout=5.0)


def on_database(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + database))


async def create_database(admin: str, name: str, template: str | None = None) -> str:
    con = await asyncpg.connect(admin)
    try:
        await con.execute(
            f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")
        )
    finally:
        await con.close()
    return on_database(admin, name)


async def apply(host: ShardHost, batch: list[BatchItem]) -> list[str]:
    """Apply a batch as a gateway would; each reply's type (or error code)."""
    replies = [_decoder.decode(r) for r in await host.apply_batch(host.catalog.version, batch)]
    return [r["type"] if r["type"] != "error" else r["code"] for r in replies]


async def play(host: ShardHost) -> None:
    """Grants, purchases (a limited item among them), redemptions, equips."""
    founders = Purchase(rid=0, key="rifle", sku="br.rifle.founders", price=1000)
    welcome = Redeem(rid=0, key="welcome", code="WELCOME-2026")
    fund: list[BatchItem] = [(u, Grant(rid=0, user=u, amount=5000, key="fund")) for u in RICH]
    assert await apply(host, fund) == ["granted"] * len(RICH)
    second: list[BatchItem] = [(u, founders) for u in RICH[:8]]
    second += [(POOR[0], founders)]  # reserved, then refused for its balance: released
    second += [(u, welcome) for u in RICH]
    second += [(u, CreateProfile(rid=0, profile="br", game="br")) for u in RICH[:5]]
    assert await apply(host, second) == (
        ["purchased"] * 8 + ["insufficient_funds"] + ["redeemed"] * 10 + ["profile_created"] * 5
    )
    third: list[BatchItem] = [
        (u, Equip(rid=0, profile="br", slot="weapon_skin", sku="br.rifle.founders"))
        for u in RICH[:5]
    ]
    third += [
        (RICH[0], founders),  # a retry: the original reply, nothing reserved
        (RICH[5], Purchase(rid=0, key="avatar", sku="plat.avatar.cyber", price=150)),
        (RICH[5], Equip(rid=0, profile="main", slot="avatar", sku="plat.avatar.cyber")),
        (RICH[6], Consume(rid=0, key="use", sku="plat.life.extra")),
        (RICH[7], Purchase(rid=0, key="bundle", sku="br.bundle.starter", price=600)),
        (RICH[8], Purchase(rid=0, key="trial", sku="br.skin.ghost.trial", price=50)),
        (RICH[9], Purchase(rid=0, key="chest", sku="plat.chest.daily", price=10)),
        (RICH[9], Purchase(rid=0, key="boost", sku="plat.booster.xp", price=5, quantity=3)),
        (POOR[1], welcome),
    ]
    assert await apply(host, third) == (
        ["equipped"] * 5
        + ["purchased", "purchased", "equipped", "consumed", "purchased", "purchased"]
        + ["purchased", "purchased", "redeemed"]
    )
    # Confirms and releases are sent after the answers: wait for them.
    for _ in range(200):
        held = host.residents.allowances
        if {STOCK, PROMO} <= held.keys() and not any(a.state.reservations for a in held.values()):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("reservations were never settled")


@pytest.fixture(scope="module")
async def clean(pg_admin: str, redis_url: str) -> str:
    """The name of a database written by a real shard host (a template to copy)."""
    name = "verify_clean"
    dsn = await create_database(pg_admin, name)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        await migrate(pool)
        await publish_catalog_text(pool, demo_catalog_text(), "demo")
    finally:
        await pool.close()
    host = ShardHost(ShardSettings(shard=1, database_url=dsn, redis_url=redis_url,
                                   starting_balance=100))  # fmt: skip
    await host.start()
    try:
        await play(host)
    finally:
        await host.close()
    return name


@pytest.fixture
async def copy(pg_admin: str, clean: str) -> str:
    """A database of the test's own, as ``clean`` left it."""
    return await create_database(pg_admin, f"verify_{next(_databases)}", template=clean)


async def run_cli(dsn: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    code = await cli._run_verify(Settings(database_url=dsn), as_json=True)
    return code, json.loads(capsys.readouterr().out)


def found(report: dict[str, Any]) -> set[tuple[str, str]]:
    return {(v["entity"], v["check"]) for v in report["violations"]}


async def test_a_database_written_by_a_shard_host_passes(
    copy: str, capsys: pytest.CaptureFixture[str]
) -> None:
    con = await asyncpg.connect(copy)
    try:
        kinds = {
            r["kind"] for r in await con.fetch("SELECT kind FROM journal WHERE user_id = $1", STOCK)
        }
        # The clean database has every step a reservation can take but abandon.
        assert kinds == {"allowance.reserve", "allowance.confirm", "allowance.release"}
        assert await con.fetchval("SELECT count(*) FROM reservation_outcomes") == 8 + 11
        reports = [await verify(con, chunk) for chunk in (1, 3, 1000)]
    finally:
        await con.close()
    assert all(r == reports[0] for r in reports)
    code, report = await run_cli(copy, capsys)
    assert (code, report) == (
        0,
        {"ok": True, "users": len(USERS), "allowances": 2, "violations": []},
    )


async def _rewrite_stock_used(con: asyncpg.Connection) -> None:
    state = allowance_decoder.decode(
        await con.fetchval("SELECT state FROM users WHERE user_id = $1", STOCK)
    )
    state.used += 1
    await con.execute(
        "UPDATE users SET state = $2 WHERE user_id = $1", STOCK, allowance_encoder.encode(state)
    )


async def _release_a_sold_reservation(con: asyncpg.Connection) -> None:
    """A release journaled after the confirm of a reservation recorded as sold."""
    row = await con.fetchrow(
        "SELECT version, change FROM journal WHERE user_id = $1 AND kind = 'allowance.confirm'"
        " ORDER BY version LIMIT 1",
        STOCK,
    )
    confirm = msgspec.msgpack.decode(row["change"], type=SagaStep)
    version = await con.fetchval("SELECT version FROM users WHERE user_id = $1", STOCK) + 1
    await con.execute(
        "INSERT INTO journal (user_id, version, at, kind, key, change)"
        " VALUES ($1, $2, 0, 'allowance.release', NULL, $3)",
        STOCK, version, msgspec.msgpack.encode(confirm.then(Step.RELEASE)),
    )  # fmt: skip
    await con.execute("UPDATE users SET version = $2 WHERE user_id = $1", STOCK, version)


Corruption = str | Callable[[asyncpg.Connection], Awaitable[None]]

#: (name, the corruption, what verify reports: (entity, check)).
CORRUPTIONS: list[tuple[str, Corruption, set[tuple[str, Check]]]] = [
    (
        "ledger-row-changed",
        "UPDATE ledger SET amount = amount + 7 WHERE user_id = 'u01' AND seq = 2",
        {("u01", Check.LEDGER_SUM), ("u01", Check.LEDGER_JOURNAL)},
    ),
    (
        "balance-changed",
        "UPDATE users SET balance = balance + 1 WHERE user_id = 'u02'",
        {("u02", Check.LEDGER_SUM), ("u02", Check.REPLAY)},
    ),
    (
        "journal-row-deleted",
        "DELETE FROM journal WHERE user_id = 'u03' AND version = 3",
        {("u03", Check.VERSIONS), ("u03", Check.LEDGER_JOURNAL)},
    ),
    (
        "key-used-twice",
        "DROP INDEX journal_key;"
        " UPDATE journal SET key = 'a:fund' WHERE user_id = 'u04' AND version = 4",
        {("u04", Check.KEYS)},
    ),
    (
        "negative-balance",
        "ALTER TABLE users DROP CONSTRAINT users_balance_check;"
        " UPDATE users SET balance = -1 WHERE user_id = 'u11'",
        {("u11", Check.NEGATIVE_BALANCE), ("u11", Check.LEDGER_SUM), ("u11", Check.REPLAY)},
    ),
    ("used-not-confirmed", _rewrite_stock_used, {(STOCK, Check.USED)}),
    (
        "sold-then-released",
        _release_a_sold_reservation,
        {(STOCK, Check.RESERVATIONS), (STOCK, Check.OUTCOMES)},
    ),
]


async def verified(dsn: str, corruption: Corruption) -> list[Report]:
    """Corrupt the database, then verify it in chunks of one row, a few, and all."""
    con = await asyncpg.connect(dsn)
    try:
        if isinstance(corruption, str):
            await con.execute(corruption)
        else:
            await corruption(con)
        return [await verify(con, chunk) for chunk in (1, 4, 1000)]
    finally:
        await con.close()


@pytest.mark.parametrize(
    ("corruption", "expected"),
    [pytest.param(c, e, id=name) for name, c, e in CORRUPTIONS],
)
async def test_each_corruption_is_reported_under_its_check(
    copy: str,
    capsys: pytest.CaptureFixture[str],
    corruption: Corruption,
    expected: set[tuple[str, Check]],
) -> None:
    reports = await verified(copy, corruption)
    assert all(r == reports[0] for r in reports)  # wherever the chunks begin and end
    code, report = await run_cli(copy, capsys)
    assert code == 1 and report["ok"] is False
    assert found(report) == {(entity, check.value) for entity, check in expected}
    assert (report["users"], report["allowances"]) == (len(USERS), 2)


async def test_journal_and_ledger_rows_without_a_state_row_are_reported(
    copy: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ranges of ids follow the state rows, and still take in the rows of an
    id that has none: between two rows (at every position of a chunk) and
    past the last one."""
    reports = await verified(copy, "DELETE FROM users WHERE user_id IN ('u05', 'u11')")
    assert all(r == reports[0] for r in reports)
    code, report = await run_cli(copy, capsys)
    assert code == 1
    assert found(report) == {
        (user, check) for user in ("u05", "u11") for check in ("journal_versions", "ledger_sum")
    }
    assert (report["users"], report["allowances"]) == (len(USERS) - 2, 2)


async def test_the_report_for_people_names_entity_check_and_detail(
    copy: str, capsys: pytest.CaptureFixture[str]
) -> None:
    con = await asyncpg.connect(copy)
    try:
        await con.execute("UPDATE users SET balance = balance + 1 WHERE user_id = 'u02'")
    finally:
        await con.close()
    code = await cli._run_verify(Settings(database_url=copy), as_json=False)
    out = capsys.readouterr().out
    assert code == 1
    assert f"verified {len(USERS)} users and 2 allowances: 2 violations" in out
    row = next(line for line in out.splitlines() if "ledger_sum" in line and "u02" in line)
    assert "balance 4151, its 4 ledger rows sum to 4150" in row


@pytest.fixture
async def unmigrated(pg_admin: str) -> AsyncIterator[str]:
    yield await create_database(pg_admin, f"verify_{next(_databases)}")


async def test_a_database_without_loadout_tables_is_not_checked(
    unmigrated: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await cli._run_verify(Settings(database_url=unmigrated), as_json=True)
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert "not a Loadout database" in captured.err
    con = await asyncpg.connect(unmigrated)
    try:  # and nothing was created in it
        assert await con.fetchval("SELECT to_regclass('users')") is None
    finally:
        await con.close()


def test_help_lists_what_verify_reads(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["verify", "--help"])
    out = capsys.readouterr().out
    for table in ("users", "journal", "ledger", "reservation_outcomes"):
        assert table in out
    assert "LOADOUT_DATABASE_URL" in out and "LOADOUT_DATA_DIR" in out and "--json" in out
