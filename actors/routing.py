"""Names every process agrees on: the shard actors' Ray names and the Redis
channels and keys.  Which shard serves an entity is the partition map's
answer (``actors.partitions``)."""

from __future__ import annotations

__all__ = [
    "STOCK_LEFT_KEY",
    "catalog_channel",
    "map_channel",
    "shard_name",
    "stock_channel",
    "user_channel",
]


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
