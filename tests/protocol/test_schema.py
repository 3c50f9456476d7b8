"""docs/protocol.schema.json is what ``python -m protocol.schema`` generates
from the message types now (a drift check), and it describes real messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from protocol.messages import (
    CatalogChanged,
    Error,
    Grant,
    InventoryEntry,
    InventoryPush,
    Purchase,
    Purchased,
    Role,
    State,
    Welcome,
)
from protocol.schema import protocol_schema, render

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "docs" / "protocol.schema.json"


def test_the_committed_schema_is_the_generated_one() -> None:
    assert COMMITTED.read_text(encoding="utf-8") == render(), (
        "docs/protocol.schema.json is stale: run"
        " `python -m protocol.schema > docs/protocol.schema.json`"
    )


def test_the_command_prints_the_schema() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "protocol.schema"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == render()


def _validator(definition: str) -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    schema = {**protocol_schema(), "$ref": f"#/$defs/{definition}"}
    del schema["anyOf"]
    return jsonschema.Draft202012Validator(schema)


def test_both_directions_are_described() -> None:
    requests = _validator("ClientMessage")
    for request in (
        State(rid=1),
        Purchase(rid="a", key="k", sku="br.rifle.dragon", price=500),
        Grant(rid=2, user="alice", amount=5, key="g"),
    ):
        assert requests.is_valid(msgspec.to_builtins(request)), request
    assert not requests.is_valid({"type": "purchase", "key": "k", "sku": "x", "price": -1})
    assert not requests.is_valid({"type": "teleport"})

    messages = _validator("ServerMessage")
    for message in (
        Welcome(user="alice", role=Role.PLAYER, protocol=1, server_time=1),
        Purchased(rid=1, purchase="p", sku="s", quantity=1, total=5, balance=0, version=2),
        Error(rid=None, code="bad_request", message="no"),
        InventoryPush(version=3, balance=0, items=[InventoryEntry("s", 1)]),
        CatalogChanged(version=2),
    ):
        assert messages.is_valid(msgspec.to_builtins(message)), message
