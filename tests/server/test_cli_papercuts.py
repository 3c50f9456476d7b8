"""The ``loadout`` command as a newcomer meets it (issue 14): run in the wrong
directory it says so in one line and makes nothing; its input errors speak the
command line's language; every command's ``--help`` lists its options and the
environment variables it reads."""

from __future__ import annotations

import argparse
import ast
import asyncio
import inspect
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from actors.catalog import Catalog, demo_catalog_text, parse_catalog
from server import cli, config
from server.config import ENVIRONMENT, Settings
from server.gateway import Gateway
from server.ratelimit import RateLimiter
from tests.server.test_gateway_answers import ScriptedBackend

REPO = Path(__file__).resolve().parents[2]
SERVER_SECRET = "the-servers-own-secret-" * 3


@pytest.fixture
def nowhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A data directory that does not exist, and no other setting."""
    for name in list(os.environ):
        if name.startswith("LOADOUT_") or name == "RAY_ADDRESS":
            monkeypatch.delenv(name)
    data_dir = tmp_path / "no-such-data-dir"
    monkeypatch.setenv("LOADOUT_DATA_DIR", str(data_dir))
    yield data_dir
    assert not data_dir.exists(), "a command other than serve made a data directory"


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize(
    "argv",
    [
        ["token", "alice"],
        ["grant", "alice", "5", "--key", "k"],
        ["catalog", "show"],
        ["verify"],
        ["orders"],
        ["refund", "alice", "pur_1", "--key", "k", "--reason", "r"],
        ["order", "retry", "ord_1"],
        ["order", "ship", "ord_1", "--carrier", "UPS", "--number", "1"],
    ],
)
def test_a_command_without_a_data_directory_says_so(
    nowhere: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert cli.main(argv) != 0
    line = one_line(capsys)
    assert line.startswith(f"loadout {argv[0]}") and f"no data directory {nowhere}" in line


def test_catalog_load_without_a_data_directory_says_so(
    nowhere: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text(demo_catalog_text())
    assert cli.main(["catalog", "load", str(path)]) != 0
    assert f"no data directory {nowhere}" in one_line(capsys)


def test_token_signs_with_the_secret_of_the_environment(
    nowhere: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.auth import verify_token

    monkeypatch.setenv("LOADOUT_SECRET", SERVER_SECRET)
    assert cli.main(["token", "alice"]) == 0
    assert verify_token(SERVER_SECRET, capsys.readouterr().out.strip()).user == "alice"


def test_a_data_directory_without_a_secret_or_a_database_is_not_filled(
    nowhere: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nowhere.mkdir()
    assert cli.main(["token", "alice"]) != 0
    assert f"no secret in {nowhere}" in one_line(capsys)
    assert cli.main(["catalog", "show"]) != 0
    assert f"no database in {nowhere}" in one_line(capsys)
    assert list(nowhere.iterdir()) == []
    nowhere.rmdir()


@pytest.mark.parametrize(
    ("amount", "user", "key", "says"),
    [
        ("-5", "alice", "k", "amount must be a whole number of gems, from 1 to"),
        ("0", "alice", "k", "amount must be a whole number of gems"),
        ("ten", "alice", "k", "amount must be a whole number of gems"),
        ("1.5", "alice", "k", "amount must be a whole number of gems"),
        ("5", "al ice", "k", "user ids are 1-64 characters"),
        ("5", "alice", "k" * 65, "--key must be 1-64 characters"),
    ],
)
def test_grant_input_errors_speak_the_users_language(
    nowhere: Path,
    capsys: pytest.CaptureFixture[str],
    amount: str,
    user: str,
    key: str,
    says: str,
) -> None:
    assert cli.main(["grant", user, amount, "--key", key]) == 2
    line = one_line(capsys)
    assert line.startswith(f"loadout grant: {says}"), line
    assert "Expected" not in line and "$." not in line


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["refund", "al ice", "pur_1", "--key", "k", "--reason", "r"], "user ids are 1-64"),
        (["refund", "alice", "p" * 65, "--key", "k", "--reason", "r"], "purchase ids are 1-64"),
        (["refund", "alice", "pur_1", "--key", "", "--reason", "r"], "--key must be 1-64"),
        (["refund", "alice", "pur_1", "--key", "k", "--reason", "r" * 257], "--reason must be"),
        (["order", "retry", ""], "order ids are 1-64"),
        (["order", "ship", "o", "--carrier", "", "--number", "1"], "--carrier must be 1-64"),
        (["order", "ship", "o", "--carrier", "C", "--number", "\0"], "--number must be 1-128"),
        (["order", "ship", "o", "--carrier", "C", "--number", "1", "--url", "ups.example"],
         "--url must be an http:// or https:// address"),
    ],
)  # fmt: skip
def test_order_commands_input_errors_speak_the_users_language(
    nowhere: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    assert cli.main(argv) == 2
    command = " ".join(argv[:2]) if argv[0] == "order" else argv[0]
    line = one_line(capsys)
    assert line.startswith(f"loadout {command}: {says}"), line
    assert "Expected" not in line and "$." not in line


def test_catalog_load_refuses_an_empty_catalog_unless_allowed(
    nowhere: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text('[[games]]\ncode = "br"\nname = "Battle Royale"\n')
    assert cli.main(["catalog", "load", str(empty)]) == 1
    assert "has no items; nothing was published (--allow-empty" in one_line(capsys)
    # Allowed, it goes on to look for the database (and finds none here).
    assert cli.main(["catalog", "load", "--allow-empty", str(empty)]) == 1
    assert "no data directory" in one_line(capsys)


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    catalog = Catalog.from_document(1, parse_catalog(demo_catalog_text()))
    gateway = Gateway(SERVER_SECRET, ScriptedBackend(), lambda: catalog, RateLimiter(10**9, 10**9))
    await gateway.start("127.0.0.1", 0)
    try:
        yield gateway
    finally:
        await gateway.stop_accepting()
        await gateway.close_all()


async def test_grant_with_the_wrong_secret_says_so_in_one_line(
    gateway: Gateway, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOADOUT_")}
    env.update(LOADOUT_SECRET="not-the-servers-secret-" * 3, PYTHONPATH=str(REPO))
    url = f"ws://127.0.0.1:{gateway.port}/v1/ws"
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "server.cli", "grant", "alice", "5", "--key", "k", "--url", url],
        env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "refused our token (unauthorized: token signature invalid)" in lines[0]
    assert "LOADOUT_SECRET" in lines[0] and SERVER_SECRET not in lines[0]


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command parser under ``parser`` (``catalog load`` and the like)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    yield from _commands(sub, (*path, name))
                else:
                    yield (*path, name), sub


#: The variables each of the server's commands reads (entry-point commands,
#: such as ``bench``, document their own).
READS = {
    ("serve",): set(ENVIRONMENT),
    ("token",): {"LOADOUT_DATA_DIR", "LOADOUT_SECRET"},
    ("grant",): {"LOADOUT_HOST", "LOADOUT_PORT", "LOADOUT_DATA_DIR", "LOADOUT_SECRET"},
    ("catalog", "load"): {"LOADOUT_DATA_DIR", "LOADOUT_DATABASE_URL", "LOADOUT_REDIS_URL"},
    ("catalog", "show"): {"LOADOUT_DATA_DIR", "LOADOUT_DATABASE_URL"},
    ("verify",): {"LOADOUT_DATA_DIR", "LOADOUT_DATABASE_URL"},
    ("orders",): {"LOADOUT_DATA_DIR", "LOADOUT_DATABASE_URL"},
    ("refund",): {"LOADOUT_HOST", "LOADOUT_PORT", "LOADOUT_DATA_DIR", "LOADOUT_SECRET"},
    ("order", "retry"): {"LOADOUT_HOST", "LOADOUT_PORT", "LOADOUT_DATA_DIR", "LOADOUT_SECRET"},
    ("order", "ship"): {"LOADOUT_HOST", "LOADOUT_PORT", "LOADOUT_DATA_DIR", "LOADOUT_SECRET"},
}


def test_every_commands_help_lists_its_options_and_environment() -> None:
    found = dict(_commands(cli._parser()))
    assert set(READS) <= set(found)
    for path, reads in READS.items():
        text = found[path].format_help()
        for action in found[path]._actions:
            for option in action.option_strings:
                assert option in text, (path, option)
        assert "environment variables:" in text, path
        listed = {
            line.split()[0] for line in text.split("environment variables:")[1].splitlines()[1:]
        }
        assert listed == reads | {"LOADOUT_LOG_LEVEL"}, path


def test_the_environment_table_names_every_variable_settings_read() -> None:
    from server.commerce import CommerceSettings

    sources = [
        inspect.getsource(config.Settings.from_env),
        inspect.getsource(CommerceSettings.from_env),  # fulfillment's (PROTOCOL.md §12)
    ]
    read = {
        node.value
        for source in sources
        for node in ast.walk(ast.parse(textwrap.dedent(source)))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and (node.value.startswith("LOADOUT_") or node.value == "RAY_ADDRESS")
        and " " not in node.value  # (not a message naming one)
    }
    assert read == set(ENVIRONMENT)
    assert Settings.from_env({}) == Settings()
