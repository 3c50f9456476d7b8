"""The operators' fulfillment commands (PROTOCOL.md §12): ``loadout orders``,
``loadout refund`` and ``loadout order retry|ship`` against a running server."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from tests.e2e.support import Client, ServerProcess, free_port, fund, new_user

ADDRESS = {"name": "Ada Lovelace", "line1": "1 Analytical St", "city": "London",
           "postal_code": "N1 7AA", "country": "GB"}  # fmt: skip
SHIRT = {"type": "purchase", "sku": "merch.tshirt.logo", "price": 3000}
VOUCHER = {"type": "purchase", "sku": "plat.voucher.steam10", "price": 2000}


def _orders(server: ServerProcess, user: str) -> list[dict[str, Any]]:
    result = server.cli("orders", "--user", user, "--json")
    assert result.returncode == 0, result.stderr
    orders: list[dict[str, Any]] = json.loads(result.stdout)["orders"]
    return orders


def _refused(result: subprocess.CompletedProcess[str], command: str, says: str) -> None:
    """A one-line refusal on stderr, nothing on stdout, a non-zero exit."""
    assert result.returncode != 0 and result.stdout == "", result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"loadout {command}: {says}"), lines[0]


async def test_orders_and_shipping_by_hand(server: ServerProcess) -> None:
    user = new_user()
    await fund(server, user, 3000)
    async with await Client.open(server, user) as c:
        await c.request({"type": "set_contact", "key": "c1", "address": ADDRESS})
        bought = await c.request({**SHIRT, "key": "s1"})
        assert bought["type"] == "purchased", bought
        order = "ord_" + bought["purchase"].removeprefix("pur_")
        (pending,) = _orders(server, user)
        assert {k: pending[k] for k in ("order", "user", "purchase", "sku", "status")} == {
            "order": order, "user": user, "purchase": bought["purchase"],
            "sku": "merch.tshirt.logo", "status": "pending",
        }  # fmt: skip
        assert (pending["delivery"], pending["tracking"]) == ("physical", None)

        unknown = server.cli("order", "ship", "ord_nope", "--carrier", "UPS", "--number", "1",
                             "--server", server.url)  # fmt: skip
        _refused(unknown, "order ship", "unknown_order")
        bad_url = server.cli("order", "ship", order, "--carrier", "UPS", "--number", "1",
                             "--url", "ftp://x", "--server", server.url)  # fmt: skip
        _refused(bad_url, "order ship", "--url must be an http:// or https:// address")
        assert bad_url.returncode == 2
        assert _orders(server, user) == [pending]  # nothing changed

        ups = ("--carrier", "UPS", "--number", "1Z999", "--url", "https://ups.example/1Z999")
        shipped = server.cli("order", "ship", order, *ups, "--server", server.url)
        assert shipped.returncode == 0, shipped.stderr
        reply = json.loads(shipped.stdout)
        assert (reply["type"], reply["order"], reply["status"]) == (
            "order_updated",
            order,
            "shipped",
        )
        push = await c.push("fulfillment", order=order, status="shipped")
        tracking = {"carrier": "UPS", "number": "1Z999", "url": "https://ups.example/1Z999"}
        assert push["tracking"] == tracking
        (entry,) = _orders(server, user)
        assert (entry["status"], entry["tracking"]) == ("shipped", tracking)
        assert [o["order"] for o in json.loads(
            server.cli("orders", "--status", "shipped", "--limit", "200", "--json").stdout
        )["orders"]].count(order) == 1  # fmt: skip
        assert _orders(server, new_user()) == []

        table = server.cli("orders", "--user", user)
        assert table.returncode == 0, table.stderr
        (row,) = [line for line in table.stdout.splitlines() if order in line]
        for cell in (user, "merch.tshirt.logo", "physical", "shipped", "UPS 1Z999"):
            assert cell in row, row

        retry = server.cli("order", "retry", order, "--server", server.url)
        _refused(retry, "order retry", "not_cancellable: the order is shipped")
        assert _orders(server, user) == [entry]


async def test_refund_gives_the_gems_back_once(server: ServerProcess) -> None:
    user = new_user()
    await fund(server, user, 1000)
    async with await Client.open(server, user) as c:
        bought = await c.request(
            {"type": "purchase", "key": "d", "sku": "br.rifle.dragon", "price": 500}
        )
        assert bought["balance"] == 500
        args = ("refund", user, bought["purchase"], "--reason", "ticket 7", "--url", server.url)
        done = server.cli(*args, "--key", "r1")
        assert done.returncode == 0, done.stderr
        reply = json.loads(done.stdout)
        assert (reply["type"], reply["user"], reply["purchase"]) == (
            "refunded",
            user,
            bought["purchase"],
        )
        assert (reply["amount"], reply["balance"]) == (500, 1000)
        push = await c.push("inventory", version=reply["version"])
        assert push["balance"] == 1000
        state = await c.request({"type": "state"})
        assert state["inventory"] == [] and state["balance"] == 1000

        again = server.cli(*args, "--key", "r1")  # the same key: the same reply
        assert again.returncode == 0 and json.loads(again.stdout) == reply
        twice = server.cli(*args, "--key", "r2")
        _refused(twice, "refund", "not_refundable")
        nothing = server.cli("refund", user, "pur_none", "--key", "r3", "--reason", "x",
                             "--url", server.url)  # fmt: skip
        _refused(nothing, "refund", "not_refundable")
        bad_key = server.cli("refund", user, bought["purchase"], "--key", "k" * 65,
                             "--reason", "x", "--url", server.url)  # fmt: skip
        _refused(bad_key, "refund", "--key must be 1-64 characters")
        assert bad_key.returncode == 2
        after = await c.request({"type": "state"})
        assert {k: v for k, v in after.items() if k != "rid"} == {
            k: v for k, v in state.items() if k != "rid"
        }
        history = await c.request({"type": "history"})
        assert [e["kind"] for e in history["entries"]].count("refund") == 1

    down = server.cli("refund", user, "pur_x", "--key", "k", "--reason", "r",
                      "--url", "ws://127.0.0.1:1/v1/ws")  # fmt: skip
    _refused(down, "refund", "cannot reach the server")


async def test_order_retry_of_a_failed_order(fresh_server: ServerProcess) -> None:
    # Mail that cannot be sent, and one attempt: the voucher order fails at once.
    fresh_server.extra_env.update(
        LOADOUT_SMTP_URL=f"smtp://127.0.0.1:{free_port()}", LOADOUT_FULFILLMENT_ATTEMPTS="1"
    )
    server = fresh_server.start()
    user = new_user()
    await fund(server, user, 2400)
    async with await Client.open(server, user) as c:
        await c.request({"type": "set_contact", "key": "c1", "email": "ada@example.com"})
        bought = await c.request({**VOUCHER, "key": "v1"})
        assert bought["type"] == "purchased" and bought["balance"] == 400, bought
        order = "ord_" + bought["purchase"].removeprefix("pur_")
        failed = await c.push("fulfillment", order=order, status="failed", timeout=30)
        (entry,) = _orders(server, user)
        assert (entry["status"], entry["attempts"]) == ("failed", 1)
        assert entry["last_error"]
        state = await c.request({"type": "state"})
        assert state["balance"] == 2400 and state["version"] == failed["version"]

        # The retry debits the order again: refused while the gems are not there.
        dragon = {"type": "purchase", "key": "d", "sku": "br.rifle.dragon", "price": 500}
        assert (await c.request(dragon))["balance"] == 1900
        short = server.cli("order", "retry", order, "--server", server.url)
        _refused(short, "order retry", "insufficient_funds")
        assert _orders(server, user) == [entry]
        await fund(server, user, 100)
        retried = server.cli("order", "retry", order, "--server", server.url)
        assert retried.returncode == 0, retried.stderr
        reply = json.loads(retried.stdout)
        assert (reply["type"], reply["order"], reply["status"]) == (
            "order_updated",
            order,
            "pending",
        )
        await c.push("fulfillment", order=order, status="pending", version=reply["version"])
        # It fails again: a retried order's steps are new ones (not the first
        # round's replayed), so it ends failed again with the gems back.
        again = await c.push("fulfillment", order=order, status="failed", timeout=30)
        assert again["version"] > reply["version"]
        assert (await c.request({"type": "state"}))["balance"] == 2000  # debited, then back
        unknown = server.cli("order", "retry", "ord_nope", "--server", server.url)
        _refused(unknown, "order retry", "unknown_order")
    server.stop()
