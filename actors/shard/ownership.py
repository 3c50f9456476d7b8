"""Which entities a shard serves: the partition map as this shard knows it,
and the partitions it is handing over (PROTOCOL.md §13).

A shard serves an entity while the map gives the entity's partition to it
and the partition is not being handed over.  Without a map (a database no
cluster has set up: the host's own tests) a shard serves everything.  A
hand-over that the map never confirms (the operator's command died half-way)
lapses after ``LEAVE_SECONDS`` and the shard serves the partition again; if
the move did commit meanwhile, the flush's fence rejects what it wrote.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from actors.partitions import PartitionMap, partition_of

__all__ = ["LEAVE_SECONDS", "Ownership"]

log = logging.getLogger("loadout.shard")

#: How long a partition waits, handed over, for the map to give it away.
LEAVE_SECONDS = 10.0


async def _no_refresh() -> None:
    return None


class Ownership:
    def __init__(self, shard: int) -> None:
        self.shard = shard
        self.map: PartitionMap | None = None
        #: Partitions being handed over, and since when (monotonic seconds).
        self.leaving: dict[int, float] = {}
        self._owned: frozenset[int] = frozenset()
        #: Reads the map again (set by the host, which has the database).
        self.refresh: Callable[[], Awaitable[None]] = _no_refresh

    @property
    def epoch(self) -> int:
        return 0 if self.map is None else self.map.epoch

    @property
    def owned(self) -> frozenset[int]:
        return self._owned

    def partition(self, entity: str) -> int:
        return 0 if self.map is None else partition_of(entity, self.map.partitions)

    def owner(self, entity: str) -> int:
        """The shard the map gives this entity to."""
        return self.shard if self.map is None else self.map.shard_of(entity)

    def serves(self, entity: str) -> bool:
        if self.map is None:
            return True
        partition = partition_of(entity, self.map.partitions)
        if self.map.owners[partition] != self.shard:
            return False
        since = self.leaving.get(partition)
        if since is None:
            return True
        if time.monotonic() - since < LEAVE_SECONDS:
            return False
        del self.leaving[partition]
        log.warning(
            "shard %d: partition %d was handed over but the map still gives it here;"
            " serving it again",
            self.shard,
            partition,
        )
        return True

    def install(self, new: PartitionMap) -> tuple[frozenset[int], frozenset[int]]:
        """Take a newer map; returns the partitions gained and lost."""
        if self.map is not None and new.epoch <= self.map.epoch:
            return frozenset(), frozenset()
        owned = new.owned_by(self.shard)
        gained, lost = owned - self._owned, self._owned - owned
        self.map, self._owned = new, owned
        for partition in lost:
            self.leaving.pop(partition, None)
        if gained or lost:
            log.info(
                "shard %d: map epoch %d, %d partitions (+%d -%d)",
                self.shard, new.epoch, len(owned), len(gained), len(lost),
            )  # fmt: skip
        return gained, lost

    def leave(self, partitions: Iterable[int]) -> frozenset[int]:
        """Stop serving these partitions (a hand-over); returns those owned."""
        now = time.monotonic()
        mine = frozenset(p for p in partitions if p in self._owned)
        for partition in mine:
            self.leaving[partition] = now
        return mine

    def of(self, entities: Iterable[str], partitions: frozenset[int]) -> set[str]:
        """The entities among these that hash to these partitions."""
        return {e for e in entities if self.partition(e) in partitions}
