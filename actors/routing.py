"""Where things live: the shard of a user or allowance, the shard actors'
Ray names, and the Redis names every process agrees on.  Everything that
routes imports its names from here."""

from __future__ import annotations

import hashlib

__all__ = [
    "STOCK_LEFT_KEY",
    "catalog_channel",
    "map_channel",
    "shard_index",
    "shard_name",
    "shard_of",
    "stock_channel",
    "user_channel",
]


def shard_index(entity_id: str, shards: int) -> int:
    """The shard of a user or allowance: stable across processes."""
    digest = hashlib.blake2b(entity_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


#: The shard of a user or allowance (the name gateways use).
shard_of = shard_index


def shard_name(shard: int) -> str:
    """The Ray actor name of a shard (in the cluster's namespace)."""
    return f"loadout-shard-{shard}"


def user_channel(user_id: str) -> str:
    return "loadout:user:" + user_id


def map_channel() -> str:
    """Announces a new partition map epoch (gateways read the map again)."""
    return "loadout:map"


def catalog_channel() -> str:
    return "loadout:catalog"


def stock_channel() -> str:
    """Announces ``[sku, units left]`` (msgpack) when a limited item's stock moves."""
    return "loadout:stock"


#: Redis hash sku -> units left, for gateways that start after the last change.
STOCK_LEFT_KEY = "loadout:stock-left"
