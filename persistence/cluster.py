"""The cluster's shared facts in PostgreSQL: the settings every process must
agree on, and the partition map (PROTOCOL.md §13).

The map is the one source of truth for routing.  ``move`` is its only
writer after the first: one transaction that reassigns partitions and bumps
the epoch; it waits for the flushes in flight of the shards losing them (a
flush holds its shard's epoch row ``FOR SHARE``), and from its commit on the
old owners can no longer write them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import asyncpg

__all__ = [
    "MapRow",
    "SettingConflict",
    "agree",
    "load_epoch",
    "load_map",
    "move",
]


class MapRow(NamedTuple):
    """The map as stored: its epoch and the owner of each partition (by index)."""

    epoch: int
    owners: tuple[int, ...]


class SettingConflict(Exception):
    """A setting differs from the one the cluster was created with."""

    def __init__(self, name: str, ours: str, theirs: str) -> None:
        super().__init__(f"{name} is {ours} here but {theirs} in the cluster")
        self.name, self.ours, self.theirs = name, ours, theirs


async def agree(
    pool: asyncpg.Pool,
    settings: Mapping[str, str],
    owners: Sequence[int],
    compare: Iterable[str] | None = None,
) -> dict[str, str]:
    """Record these settings and the first map if the cluster is new; else
    check them (those named in ``compare``, by default all) against the
    cluster's.  Returns the cluster's settings.  Raises ``SettingConflict``
    naming the first setting that differs."""
    async with pool.acquire() as con, con.transaction():
        # One process creates the cluster; the others wait here and compare.
        await con.execute("LOCK TABLE cluster_settings IN SHARE ROW EXCLUSIVE MODE")
        rows = await con.fetch("SELECT name, value FROM cluster_settings")
        stored = {r["name"]: r["value"] for r in rows}
        if not stored:
            await con.executemany(
                "INSERT INTO cluster_settings (name, value) VALUES ($1, $2)",
                sorted(settings.items()),
            )
            await con.execute(
                "INSERT INTO cluster_map (epoch, partitions) VALUES (1, $1)", len(owners)
            )
            await con.execute(
                "INSERT INTO partition_map (partition, shard, epoch)"
                " SELECT p - 1, s, 1 FROM unnest($1::integer[]) WITH ORDINALITY AS o(s, p)",
                list(owners),
            )
            return dict(settings)
    names = set(settings) if compare is None else set(compare)
    for name, value in sorted(settings.items()):
        if name in names and name in stored and stored[name] != value:
            raise SettingConflict(name, value, stored[name])
    return stored


async def load_map(pool: asyncpg.Pool | asyncpg.Connection) -> MapRow | None:
    """The map, or None if there is none (a database no cluster has used)."""
    rows = await pool.fetch(
        "SELECT m.epoch, p.shard FROM cluster_map m, partition_map p ORDER BY p.partition"
    )
    if not rows:
        return None
    return MapRow(rows[0]["epoch"], tuple(r["shard"] for r in rows))


async def load_epoch(pool: asyncpg.Pool) -> int:
    """The map's epoch (0 without a map): one cheap read to poll for changes."""
    epoch: int | None = await pool.fetchval("SELECT epoch FROM cluster_map")
    return epoch or 0


async def move(pool: asyncpg.Pool, moves: Mapping[int, int], expect: int | None = None) -> int:
    """Give each partition to its new shard; returns the map's new epoch.
    With ``expect``, refuses (``ValueError``) if the map changed since that
    epoch (two operators moving at once)."""
    async with pool.acquire() as con, con.transaction():
        epoch: int = await con.fetchval("SELECT epoch FROM cluster_map FOR UPDATE")
        if epoch is None:
            raise ValueError("there is no partition map")
        if expect is not None and epoch != expect:
            raise ValueError(f"the map changed meanwhile (epoch {epoch}, expected {expect})")
        epoch += 1
        parts = sorted(moves)
        # The shards losing partitions: wait for their flushes in flight (each
        # holds its shard's epoch row FOR SHARE); their next ones read this map.
        await con.execute(
            "SELECT 1 FROM shard_epochs WHERE shard IN"
            " (SELECT shard FROM partition_map WHERE partition = ANY ($1::integer[]))"
            " ORDER BY shard FOR UPDATE",
            parts,
        )
        await con.execute(
            "UPDATE partition_map AS m SET shard = n.shard, epoch = $3"
            " FROM unnest($1::integer[], $2::integer[]) AS n(partition, shard)"
            " WHERE m.partition = n.partition",
            parts,
            [moves[p] for p in parts],
            epoch,
        )
        await con.execute("UPDATE cluster_map SET epoch = $1, updated_at = now()", epoch)
        return epoch
