"""The ``loadout`` parser: commands kept outside the server arrive through the
``loadout.commands`` entry points (``bench`` is one), and one that cannot be
imported leaves the others working."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import pytest

from server import cli
from server.config import Settings

REPO = Path(__file__).resolve().parents[2]


def register_hello(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """A command of another package, for the entry-point tests."""
    hello = commands.add_parser("hello", help="say hello")
    hello.add_argument("name")
    hello.set_defaults(run=lambda settings, args: len(args.name))


def _only(*entries: EntryPoint) -> object:
    def fake(*, group: str) -> list[EntryPoint]:
        return list(entries) if group == cli.COMMANDS_GROUP else []

    return fake


def test_loadout_help_lists_bench_from_its_entry_point() -> None:
    declared = {e.name: e.value for e in entry_points(group=cli.COMMANDS_GROUP)}
    assert declared.get("bench") == "bench.main:register", (
        f"{declared}: reinstall the package (pip install -e .) to refresh its entry points"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOADOUT_")}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "--help"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "bench" in result.stdout and "--baseline lock" in result.stdout
    args = cli._parser().parse_args(["bench", "--baseline", "lock", "--connections", "4"])
    assert args.run.__module__ == "bench.main"
    assert (args.baseline, args.connections) == ("lock", 4)


def test_commands_come_from_the_entry_point_group(monkeypatch: pytest.MonkeyPatch) -> None:
    hello = EntryPoint("hello", f"{__name__}:register_hello", cli.COMMANDS_GROUP)
    monkeypatch.setattr(cli, "entry_points", _only(hello))
    parser = cli._parser()
    assert "say hello" in parser.format_help()
    args = parser.parse_args(["hello", "world"])
    assert args.run(Settings(), args) == 5
    with pytest.raises(SystemExit):  # not declared, not there
        parser.parse_args(["bench"])


def test_a_command_that_cannot_be_imported_is_left_out(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = EntryPoint("broken", "no_such_package_here.main:register", cli.COMMANDS_GROUP)
    hello = EntryPoint("hello", f"{__name__}:register_hello", cli.COMMANDS_GROUP)
    monkeypatch.setattr(cli, "entry_points", _only(broken, hello))
    parser = cli._parser()
    assert "no 'broken' command" in capsys.readouterr().err
    assert parser.parse_args(["serve"]).run is cli._cmd_serve
    assert parser.parse_args(["hello", "you"]).name == "you"
