"""Partitions: which shard serves an entity (PROTOCOL.md §13, DESIGN.md
"Partitions: how the cluster grows").

Every entity (a user, or an allowance such as ``stock:<sku>``) hashes to one
of a fixed number of partitions, fixed when the database is created.  The
partition map, kept in PostgreSQL with an epoch that every change bumps,
assigns each partition to a shard actor; it is the one thing gateways route
by and the one thing a shard's writes are fenced by.  Moving partitions is
how the cluster grows, shrinks and spreads over nodes.

Pure code: the hash, the map as a value, and the plans for scaling and
spreading (which partitions move where).  No I/O here.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

__all__ = [
    "DEFAULT_PARTITIONS",
    "MAX_PARTITIONS",
    "PartitionMap",
    "balance",
    "initial_owners",
    "partition_of",
    "spread",
]

_K = TypeVar("_K", int, str)

DEFAULT_PARTITIONS = 256
MAX_PARTITIONS = 65_536


def partition_of(entity_id: str, partitions: int) -> int:
    """The partition of an entity: stable across processes and versions."""
    digest = hashlib.blake2b(entity_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions


def initial_owners(partitions: int, shards: int) -> tuple[int, ...]:
    """A new cluster's map: partition ``p`` on shard ``p % shards``.  With a
    shard count that divides the partitions this is where the hash put users
    before partitions existed (``h % P % S == h % S``)."""
    return tuple(p % shards for p in range(partitions))


@dataclass(frozen=True)
class PartitionMap:
    """Partition -> shard, as of ``epoch``."""

    epoch: int
    owners: tuple[int, ...]

    @property
    def partitions(self) -> int:
        return len(self.owners)

    def partition(self, entity_id: str) -> int:
        return partition_of(entity_id, len(self.owners))

    def shard_of(self, entity_id: str) -> int:
        return self.owners[partition_of(entity_id, len(self.owners))]

    def shards(self) -> list[int]:
        """The shards that own at least one partition, in order."""
        return sorted(set(self.owners))

    def owned_by(self, shard: int) -> frozenset[int]:
        return frozenset(p for p, s in enumerate(self.owners) if s == shard)

    def load(self) -> Counter[int]:
        """Partitions per shard."""
        return Counter(self.owners)


def _even_out(holdings: dict[_K, list[int]], total: int) -> tuple[dict[_K, int], list[int]]:
    """Quotas for ``total`` things over the keys of ``holdings``, within one
    of each other (the keys holding most keep the larger quotas: fewer
    moves); what each holds beyond its quota is taken out and returned."""
    base, extra = divmod(total, len(holdings))
    by_size = sorted(holdings, key=lambda k: (-len(holdings[k]), k))
    quota = {k: base + (1 if i < extra else 0) for i, k in enumerate(by_size)}
    surplus: list[int] = []
    for key, held in holdings.items():
        over = len(held) - quota[key]
        if over > 0:
            surplus.extend(held[-over:])
            del held[-over:]
    return quota, surplus


def balance(owners: tuple[int, ...], shards: Iterable[int]) -> dict[int, int]:
    """The fewest moves (partition -> new shard) that leave ``shards`` (and only
    them) owning the partitions, each within one partition of the others.

    Partitions of shards not in ``shards`` all move; then the fullest shards
    give to the emptiest.  Shards that keep their share keep their partitions
    (a moved partition pauses and its users reload)."""
    wanted = sorted(set(shards))
    if not wanted:
        raise ValueError("at least one shard is needed")
    current: dict[int, list[int]] = {s: [] for s in wanted}
    homeless: list[int] = []
    for partition, shard in enumerate(owners):
        (current[shard] if shard in current else homeless).append(partition)
    quota, surplus = _even_out(current, len(owners))
    homeless = sorted(homeless + surplus)
    moves: dict[int, int] = {}
    for shard in wanted:
        while len(current[shard]) < quota[shard]:
            partition = homeless.pop()
            current[shard].append(partition)
            moves[partition] = shard
    assert not homeless
    return moves


def spread(shard_nodes: Mapping[int, str | None], nodes: Iterable[str]) -> list[tuple[int, str]]:
    """Which shards to replace, and on which node, so that the live ``nodes``
    each host a fair share of the shards (counts within one of each other).

    ``shard_nodes`` says where each shard runs (``None``: not known or on a
    dead node).  Returns ``(shard, node)`` pairs: a new shard is made on the
    node and the old one's partitions move to it."""
    live = sorted(set(nodes))
    if not live:
        return []
    hosted: dict[str, list[int]] = {n: [] for n in live}
    misplaced: list[int] = []
    for shard, node in sorted(shard_nodes.items()):
        (hosted[node] if node in hosted else misplaced).append(shard)
    quota, surplus = _even_out(hosted, len(shard_nodes))
    misplaced += surplus
    plan: list[tuple[int, str]] = []
    for node in live:
        while len(hosted[node]) < quota[node] and misplaced:
            shard = misplaced.pop(0)
            hosted[node].append(shard)
            plan.append((shard, node))
    return plan
