"""Fulfillment and money (PROTOCOL.md §12) over real sockets, on the laptop
defaults: email goes to ``<data dir>/outbox/``, physical orders wait for an
operator's ``ship_order``, payments are signed with the secret ``serve``
generated into the data directory."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from email import message_from_bytes
from typing import Any

import httpx

from protocol.messages import Role
from server.signatures import payment_sign
from tests.e2e.support import Client, ServerProcess, fund, new_user

ADDRESS = {"name": "Ada Lovelace", "line1": "1 Analytical St", "city": "London",
           "postal_code": "N1 7AA", "country": "GB"}  # fmt: skip
VOUCHER = {"type": "purchase", "sku": "plat.voucher.steam10", "price": 2000}
SHIRT = {"type": "purchase", "sku": "merch.tshirt.logo", "price": 3000}


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return {k: v for k, v in a.items() if k != "rid"} == {k: v for k, v in b.items() if k != "rid"}


async def test_a_voucher_is_emailed_to_the_outbox(server: ServerProcess) -> None:
    user = new_user()
    await fund(server, user, 5000)
    async with await Client.open(server, user) as c, await Client.open(server, user) as other:
        before = await c.request({"type": "state"})
        refused = await c.request({**VOUCHER, "key": "v0"})
        assert refused["code"] == "address_required"
        assert _same_state(await c.request({"type": "state"}), before)
        contact = await c.request({"type": "set_contact", "key": "c1", "email": "ada@example.com"})
        assert contact["type"] == "contact" and contact["email"] == "ada@example.com"
        bought = await c.request({**VOUCHER, "key": "v1"})
        assert bought["type"] == "purchased" and bought["balance"] == 3000
        order = "ord_" + bought["purchase"].removeprefix("pur_")
        pending = await other.push("fulfillment", order=order, status="pending")
        assert pending["sku"] == "plat.voucher.steam10" and pending["voucher"] is None
        done = await other.push("fulfillment", order=order, status="completed", timeout=20)
        code = done["voucher"]
        assert len(code.replace("-", "")) >= 16
        mail = message_from_bytes((server.data_dir / "outbox" / f"{order}.eml").read_bytes())
        assert mail["To"] == "ada@example.com"
        body = (
            mail.get_payload(decode=True)
            if not mail.is_multipart()
            else b"".join(
                part.get_payload(decode=True) or b""
                for part in mail.walk()
                if not part.is_multipart()
            )
        )
        assert code.encode() in body
        page = await c.request({"type": "orders"})
        (entry,) = page["entries"]
        assert (entry["order"], entry["status"], entry["voucher"]) == (order, "completed", code)
        assert entry["delivery"] == "email" and entry["purchase"] == bought["purchase"]
        state = await c.request({"type": "state"})
        assert state["inventory"] == [] and state["balance"] == 3000
        assert state["contact"] == {"email": "ada@example.com", "address": None}
        late = await c.request({"type": "cancel_order", "key": "x1", "order": order})
        assert late["code"] == "not_cancellable"


async def test_merchandise_is_shipped_by_hand(server: ServerProcess) -> None:
    user = new_user()
    await fund(server, user, 3000)
    async with await Client.open(server, user) as c:
        assert (await c.request({**SHIRT, "key": "s0"}))["code"] == "address_required"
        bad = await c.request({"type": "set_contact", "key": "c0",
                               "address": {**ADDRESS, "country": "XX"}})  # fmt: skip
        assert bad["code"] == "bad_request" and "address" in bad["message"]
        await c.request({"type": "set_contact", "key": "c1", "address": ADDRESS})
        bought = await c.request({**SHIRT, "key": "s1"})
        order = "ord_" + bought["purchase"].removeprefix("pur_")
        await asyncio.sleep(1.5)  # no shop: the worker leaves it alone
        (entry,) = (await c.request({"type": "orders"}))["entries"]
        assert entry["status"] == "pending" and entry["attempts"] == 0
        async with await Client.open(server, "ops", role=Role.ADMIN) as admin:
            ship = {"type": "ship_order", "order": order, "carrier": "UPS", "number": "1Z999",
                    "url": "https://ups.example/1Z999"}  # fmt: skip
            shipped = await admin.request(ship)
            assert shipped["type"] == "order_updated" and shipped["status"] == "shipped"
            unknown = await admin.request({"type": "ship_order", "order": "ord_nope",
                                           "carrier": "UPS", "number": "1"})  # fmt: skip
            assert unknown["code"] == "unknown_order"
        push = await c.push("fulfillment", order=order, status="shipped")
        assert push["tracking"] == {"carrier": "UPS", "number": "1Z999",
                                    "url": "https://ups.example/1Z999"}  # fmt: skip
        assert (await c.request({"type": "cancel_order", "key": "k", "order": order}))[
            "code"
        ] == "not_cancellable"
        forbidden = await c.request({"type": "ship_order", "order": order, "carrier": "X",
                                     "number": "1"})  # fmt: skip
        assert forbidden["code"] == "forbidden"


async def test_cancel_order_gives_the_gems_back(server: ServerProcess) -> None:
    user = new_user()
    await fund(server, user, 3000)
    async with await Client.open(server, user) as c, await Client.open(server, user) as other:
        await c.request({"type": "set_contact", "key": "c1", "address": ADDRESS})
        bought = await c.request({**SHIRT, "key": "s1"})
        order = "ord_" + bought["purchase"].removeprefix("pur_")
        cancelled = await c.request({"type": "cancel_order", "key": "x1", "order": order})
        assert cancelled["type"] == "order_cancelled"
        assert (cancelled["refunded"], cancelled["balance"]) == (3000, 3000)
        again = await c.request({"type": "cancel_order", "key": "x1", "order": order})
        assert _same_state(again, cancelled)  # the same key: the same reply
        assert (await c.request({"type": "cancel_order", "key": "x2", "order": order}))[
            "code"
        ] == "not_cancellable"
        await other.push("fulfillment", order=order, status="cancelled")
        history = await c.request({"type": "history", "limit": 2})
        assert [(e["kind"], e["amount"]) for e in history["entries"]] == [
            ("refund", 3000), ("purchase", -3000),
        ]  # fmt: skip
        assert (await c.request({"type": "cancel_order", "key": "x3", "order": "ord_0"}))[
            "code"
        ] == "unknown_order"


async def test_a_gem_pack_credits_its_gems(server: ServerProcess) -> None:
    user = new_user()
    await fund(server, user, 450)
    async with await Client.open(server, user) as c:
        bought = await c.request({"type": "purchase", "key": "g", "sku": "plat.gems.bonus",
                                  "price": 450})  # fmt: skip
        assert bought["balance"] == 500
        state = await c.request({"type": "state"})
        assert state["inventory"] == [] and state["balance"] == 500


async def test_refund_of_an_equipped_item_unequips_it(server: ServerProcess) -> None:
    user = new_user()
    await fund(server, user, 1000)
    async with await Client.open(server, user) as c:
        await c.request({"type": "create_profile", "profile": "br", "game": "br"})
        bought = await c.request({"type": "purchase", "key": "d", "sku": "br.rifle.dragon",
                                  "price": 500})  # fmt: skip
        await c.request({"type": "equip", "profile": "br", "slot": "weapon_skin",
                         "sku": "br.rifle.dragon"})  # fmt: skip
        refund = {"type": "refund", "user": user, "purchase": bought["purchase"], "key": "r1",
                  "reason": "support ticket 7"}  # fmt: skip
        async with await Client.open(server, "ops", role=Role.ADMIN) as admin:
            done = await admin.request(refund)
            assert done["type"] == "refunded"
            assert (done["amount"], done["balance"]) == (500, 1000)
            assert _same_state(await admin.request(refund), done)
            twice = await admin.request({**refund, "key": "r2"})
            assert twice["code"] == "not_refundable"
            nothing = await admin.request({**refund, "key": "r3", "purchase": "pur_none"})
            assert nothing["code"] == "not_refundable"
        loadout = await c.push("loadout", profile="br", version=done["version"])
        assert loadout["equipped"] == {}
        state = await c.request({"type": "state"})
        assert state["inventory"] == [] and state["balance"] == 1000
        # Bought again and consumed elsewhere: no longer held, not refundable.
        async with await Client.open(server, user) as c2:
            assert (await c2.request({"type": "refund", **{k: v for k, v in refund.items()
                                      if k != "type"}}))["code"] == "forbidden"  # fmt: skip


def _signed(secret: str, body: dict[str, Any], at: int | None = None) -> tuple[bytes, str]:
    raw = json.dumps(body).encode()
    return raw, payment_sign(raw, secret, int(time.time()) if at is None else at)


async def test_payments_credit_once_and_chargebacks_make_debt(server: ServerProcess) -> None:
    secret = (server.data_dir / "payments_webhook_secret").read_text().strip()
    url = f"http://127.0.0.1:{server.http_port}/v1/webhooks/payments"
    user = new_user()
    tx = "tx_" + uuid.uuid4().hex
    paid = {"id": "evt_1", "type": "payment.succeeded", "transaction": tx, "user": user,
            "gems": 1000}  # fmt: skip
    async with httpx.AsyncClient(timeout=30) as http:

        async def deliver(body: dict[str, Any], at: int | None = None,
                          signature: str | None = None) -> httpx.Response:  # fmt: skip
            raw, signed = _signed(secret, body, at)
            headers = {"Loadout-Signature": signature or signed,
                       "Content-Type": "application/json"}  # fmt: skip
            return await http.post(url, content=raw, headers=headers)

        forged = await deliver(paid, signature="t=1,v1=" + "0" * 64)
        stale = await deliver(paid, at=int(time.time()) - 600)
        assert (forged.status_code, stale.status_code) == (401, 401)
        answers = await asyncio.gather(*(deliver(paid) for _ in range(50)))
        assert {a.status_code for a in answers} == {200}, [a.text for a in answers]
        async with await Client.open(server, user) as c:
            state = await c.request({"type": "state"})
            assert (state["balance"], state["debt"]) == (1000, 0)
            history = await c.request({"type": "history"})
            assert [(e["kind"], e["amount"]) for e in history["entries"]] == [("topup", 1000)]
            spent = await c.request({"type": "purchase", "key": "p1", "sku": "br.rifle.dragon",
                                     "price": 500})  # fmt: skip
            assert spent["balance"] == 500
            back = await deliver({**paid, "id": "evt_2", "type": "payment.refunded"})
            assert back.status_code == 200 and back.json()["debt"] == 500
            assert (await deliver({**paid, "id": "evt_3", "type": "payment.refunded"})).json()[
                "debt"
            ] == 500  # once
            state = await c.request({"type": "state"})
            assert (state["balance"], state["debt"]) == (0, 500)
            await fund(server, user, 300)
            blocked = await c.request({"type": "purchase", "key": "p2", "sku": "plat.life.extra",
                                       "price": 20})  # fmt: skip
            assert blocked["code"] == "insufficient_funds"
            more = {**paid, "id": "evt_4", "transaction": tx + "b", "gems": 400}
            assert (await deliver(more)).json() == {"outcome": "applied", "balance": 200,
                                                    "debt": 0}  # fmt: skip
            ok = await c.request({"type": "purchase", "key": "p3", "sku": "plat.life.extra",
                                  "price": 20})  # fmt: skip
            assert ok["type"] == "purchased" and ok["balance"] == 180
        metrics = (await http.get(f"http://127.0.0.1:{server.http_port}/metrics")).text
        counted = {
            line.split("{")[1].split("}")[0]: float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("loadout_webhooks_total{")
        }
        assert counted['outcome="401",source="payments"'] >= 2
        assert counted['outcome="applied",source="payments"'] >= 53


async def test_ids_the_database_cannot_hold_are_bad_requests(server: ServerProcess) -> None:
    # Found by the fuzz: an ``orders`` cursor with a NUL reached PostgreSQL and
    # failed the shard's whole batch (every request in it got ``unavailable``).
    user = new_user()
    async with await Client.open(server, user) as c:
        for request in (
            {"type": "orders", "before": "ord_\u0000"},
            {"type": "cancel_order", "key": "k", "order": "ord_\u0000"},
        ):
            assert (await c.request(request))["code"] == "bad_request"
        assert (await c.request({"type": "orders", "before": "ord_none"}))["entries"] == []
