"""The ``loadout`` command line (PROTOCOL.md §8) against a running server."""

from __future__ import annotations

import json
from pathlib import Path

from actors.catalog import demo_catalog_text
from persistence.embedded import EmbeddedPostgres
from protocol.messages import Role
from server.auth import verify_token
from tests.e2e.support import SECRET, Client, ServerProcess, new_user


def test_token(server: ServerProcess) -> None:
    result = server.cli("token", "alice", "--role", "admin", "--ttl", "60")
    assert result.returncode == 0, result.stderr
    identity = verify_token(SECRET, result.stdout.strip())
    assert identity.user == "alice" and identity.role is Role.ADMIN
    bad = server.cli("token", "no spaces allowed")
    assert bad.returncode != 0 and "user" in bad.stderr


async def test_grant_through_the_running_server(server: ServerProcess) -> None:
    user = new_user()
    async with await Client.open(server, user) as c:
        args = ("grant", user, "300", "--key", "cli-1", "--reason", "support ticket 42")
        result = server.cli(*args, "--url", server.url)
        assert result.returncode == 0, result.stderr
        reply = json.loads(result.stdout)
        assert (reply["type"], reply["user"], reply["balance"]) == ("granted", user, 300)
        push = await c.push("inventory", version=reply["version"])
        assert push["balance"] == 300
        again = server.cli(*args, "--url", server.url)
        assert json.loads(again.stdout)["version"] == reply["version"]  # idempotent
        history = await c.request({"type": "history"})
        assert [(e["kind"], e["amount"], e["key"]) for e in history["entries"]] == [
            ("grant", 300, "cli-1")
        ]
    down = server.cli("grant", user, "1", "--key", "x", "--url", "ws://127.0.0.1:1/v1/ws")
    assert down.returncode != 0 and "cannot reach" in down.stderr


async def test_catalog_load_publishes_live(fresh_server: ServerProcess, tmp_path: Path) -> None:
    server = fresh_server.start()
    user = new_user()
    async with await Client.open(server, "ops", role=Role.ADMIN) as admin:
        await admin.request({"type": "grant", "user": user, "amount": 1000, "key": "g"})
    text = demo_catalog_text().replace("price = 500", "price = 450")
    text += '\n[[items]]\nsku = "br.hat.new"\nname = "New Hat"\ngame = "br"\ncategory = "hats"\n'
    text += 'kind = "non_consumable"\nprice = 10\nslot = "hat"\n'
    path = tmp_path / "catalog.toml"
    path.write_text(text)
    async with await Client.open(server, user) as c:
        before = await c.request({"type": "catalog", "limit": 200})
        result = server.cli("catalog", "load", str(path))
        assert result.returncode == 0, result.stderr
        assert "published catalog version 2" in result.stdout
        changed = await c.push("catalog_changed")
        assert changed == {"type": "catalog_changed", "version": 2}
        after = await c.request({"type": "catalog", "limit": 200})
        assert after["version"] == 2 and before["version"] == 1
        assert "br.hat.new" in [i["sku"] for i in after["items"]]
        old = await c.request(
            {"type": "purchase", "key": "a", "sku": "br.rifle.dragon", "price": 500}
        )
        assert old["code"] == "price_changed"
        new = await c.request(
            {"type": "purchase", "key": "b", "sku": "br.rifle.dragon", "price": 450}
        )
        assert new["type"] == "purchased" and new["total"] == 450

        bad = tmp_path / "bad.toml"
        bad.write_text(text.replace('price = 10\nslot = "hat"', 'price = "ten"\nslot = "hat"'))
        refused = server.cli("catalog", "load", str(bad))
        assert refused.returncode != 0
        assert "br.hat.new" in refused.stderr and "price" in refused.stderr
        still = await c.request({"type": "catalog", "limit": 1})
        assert still["version"] == 2
    server.stop()


def make_database(data_dir: Path) -> None:
    """The embedded database a first ``loadout serve`` would have made."""
    data_dir.mkdir(parents=True, exist_ok=True)
    postgres = EmbeddedPostgres(data_dir)
    postgres.start()
    postgres.stop()


def test_catalog_load_without_a_running_server(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path / "data", None)
    path = tmp_path / "c.toml"
    path.write_text(demo_catalog_text())
    # Only ``serve`` makes a database: publishing into a new one no server reads is a mistake.
    nothing = proc.cli("catalog", "load", str(path))
    assert nothing.returncode == 1 and "no database in" in nothing.stderr, nothing.stderr
    assert list(proc.data_dir.iterdir()) == []
    make_database(proc.data_dir)
    result = proc.cli("catalog", "load", str(path))
    assert result.returncode == 0, result.stderr
    assert "published catalog version 1" in result.stdout
    missing = proc.cli("catalog", "load", str(tmp_path / "missing.toml"))
    assert missing.returncode != 0 and "cannot read" in missing.stderr
