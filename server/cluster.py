"""A gateway's part in the cluster: agreeing on the settings, reading the
partition map, and placing shard actors on Ray's nodes (PROTOCOL.md §13).

``join`` runs at every gateway's start: the first gateway of a new database
records the partition count and a digest of the secret and makes the first
map (``LOADOUT_SHARDS`` shards); every later one must agree, or it refuses to
start and names the setting.  ``LOADOUT_SHARDS`` means nothing to a cluster
that exists: ``loadout cluster scale`` changes the shard count.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from actors.partitions import DEFAULT_PARTITIONS, PartitionMap, initial_owners
from persistence import cluster
from server.config import ConfigError, Settings

__all__ = [
    "GATEWAYS_KEY",
    "announce_gateway",
    "join",
    "listed_gateways",
    "live_nodes",
    "loopback_ray",
    "place",
    "read_map",
    "secret_digest",
]

log = logging.getLogger("loadout.cluster")


def loopback_ray(address: str | None) -> None:
    """Before Ray is imported: a Ray on loopback only (the embedded one, or a
    cluster on one machine) must be reached on loopback; on Linux Ray would
    otherwise "canonicalize" 127.0.0.1 to the machine's address."""
    import os

    if address is None or address.startswith(("127.0.0.1:", "localhost:", "[::1]:")):
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def secret_digest(secret: str) -> str:
    """What the database keeps of the secret: enough to tell two apart, not to sign."""
    mac = hmac.new(secret.encode(), b"loadout: one secret per cluster", hashlib.sha256)
    return mac.hexdigest()[:32]


async def read_map(pool: asyncpg.Pool) -> PartitionMap | None:
    row = await cluster.load_map(pool)
    return None if row is None else PartitionMap(row.epoch, row.owners)


async def join(pool: asyncpg.Pool, settings: Settings) -> PartitionMap:
    """Agree with the cluster on the settings that must agree, making the
    cluster if the database has none; the map as it is now."""
    partitions = settings.partitions or DEFAULT_PARTITIONS
    ours = {"secret": secret_digest(settings.secret), "partitions": str(partitions)}
    compare = ["secret"] + (["partitions"] if settings.partitions is not None else [])
    try:
        await cluster.agree(pool, ours, initial_owners(partitions, settings.shards), compare)
    except cluster.SettingConflict as exc:
        if exc.name == "secret":
            raise ConfigError(
                "LOADOUT_SECRET differs from the one this cluster's database was set up"
                " with; every gateway must use the same secret"
            ) from None
        raise ConfigError(
            f"LOADOUT_PARTITIONS is {exc.ours} here but the cluster has {exc.theirs};"
            " it is fixed when the database is created"
        ) from None
    found = await read_map(pool)
    if found is None:
        raise ConfigError("the database has cluster settings but no partition map")
    shards = len(found.shards())
    if settings.shards != shards:
        log.info(
            "the cluster has %d shards (LOADOUT_SHARDS=%d applies to a new cluster only;"
            " `loadout cluster scale N` changes it)",
            shards,
            settings.shards,
        )
    return found


#: Redis hash: gateway -> JSON {address, pid, connections, at}, refreshed by each.
GATEWAYS_KEY = "loadout:gateways"
GATEWAY_PERIOD = 5.0


async def announce_gateway(
    redis: aioredis.Redis, address: str, connections: Callable[[], int]
) -> None:
    """Keep this gateway listed for ``loadout cluster status`` (runs until cancelled)."""
    me = f"{address}/{os.getpid()}"
    try:
        while True:
            entry = {
                "address": address, "pid": os.getpid(), "connections": connections(),
                "at": time.time(),
            }  # fmt: skip
            try:
                await redis.hset(GATEWAYS_KEY, me, json.dumps(entry))
            except Exception as exc:
                log.debug("could not list this gateway: %r", exc)
            await asyncio.sleep(GATEWAY_PERIOD)
    finally:
        with contextlib.suppress(Exception):
            await redis.hdel(GATEWAYS_KEY, me)


async def listed_gateways(redis: aioredis.Redis) -> list[dict[str, Any]]:
    """Gateways heard from within three periods (older entries are dropped)."""
    found = await redis.hgetall(GATEWAYS_KEY)
    live, stale = [], []
    for key, value in found.items():
        entry = json.loads(value)
        if time.time() - float(entry.get("at", 0)) <= 3 * GATEWAY_PERIOD:
            live.append(entry)
        else:
            stale.append(key)
    if stale:
        await redis.hdel(GATEWAYS_KEY, *stale)
    return sorted(live, key=lambda e: (str(e["address"]), int(e["pid"])))


def live_nodes() -> list[dict[str, Any]]:
    """Ray's live nodes (``ray.nodes()`` entries), in a stable order."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]
    return sorted(nodes, key=lambda n: str(n["NodeID"]))


def place(shards: list[int]) -> dict[int, str]:
    """A live node for each shard: shard ``s`` on the ``s mod n``-th of the
    ``n`` live nodes (the same answer in every gateway, so two starting at
    once agree; after a node is lost, its shards land on live ones)."""
    nodes = [str(n["NodeID"]) for n in live_nodes()]
    if not nodes:
        return {}
    return {shard: nodes[shard % len(nodes)] for shard in shards}
