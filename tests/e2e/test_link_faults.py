"""Faults on the path from a gateway to its shards, over a real server, Ray
and PostgreSQL: a shard fenced out by a newer owner closes its link and
retires, and the gateway links to the shard's next incarnation."""

from __future__ import annotations

import asyncio
import json
import time

import asyncpg
import ray

from actors.routing import shard_name
from protocol.messages import Role
from tests.e2e.support import Client, ServerProcess, first_shard_of, new_user


async def test_a_fenced_shard_retires_and_the_gateway_follows_its_successor(
    fresh_server: ServerProcess,
) -> None:
    server = fresh_server.start()
    services = json.loads((server.data_dir / "run" / "services.json").read_text())
    user = new_user("z")
    shard = first_shard_of(user, server.shards)
    actor = ray.get_actor(shard_name(shard), namespace=server.namespace)
    before = await actor.stats.remote()
    async with await Client.open(server, "ops", role=Role.ADMIN) as admin:
        first = await admin.request({"type": "grant", "user": user, "amount": 5, "key": "g0"})
        assert first["type"] == "granted"
        # Another owner takes the shard's epoch: this actor may never write again.
        con = await asyncpg.connect(services["database_url"])
        try:
            await con.execute("UPDATE shard_epochs SET epoch = epoch + 1 WHERE shard = $1", shard)
        finally:
            await con.close()
        deadline = time.monotonic() + 30
        reply: dict[str, object] = {}
        while time.monotonic() < deadline:
            reply = await admin.request({"type": "grant", "user": user, "amount": 7, "key": "g1"})
            if reply["type"] == "granted":
                break
            assert reply["code"] == "unavailable", reply
            await asyncio.sleep(0.2)
        assert reply["type"] == "granted" and reply["balance"] == 12, reply
        again = await admin.request({"type": "grant", "user": user, "amount": 7, "key": "g1"})
        assert again["balance"] == 12  # applied once
    after = await actor.stats.remote()
    assert after["pid"] != before["pid"] and after["epoch"] > before["epoch"] + 1
