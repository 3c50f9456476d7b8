"""Operators' cluster commands (PROTOCOL.md §13): status, scale, rebalance.

Scaling and spreading are both *moving partitions*.  A move is a hand-over,
a few partitions at a time (``CHUNK``):

1. the old owner stops serving them (its answers become ``MOVED``, which
   gateways hold back, not pass on), lets what is applying finish, flushes
   its journal and drops their entities from memory (``ShardActor.release``);
2. one transaction gives them to the new owner in the map and bumps the
   epoch; from its commit on the old owner's flushes cannot write them
   (the journal's partition fence), whatever it still believes;
3. the new owner reads the map (``ShardActor.adopt``); gateways read it on
   a notice on Redis, the ``MOVED`` answers, or a poll, and send the held
   requests there.  The users reload from PostgreSQL.

A partition is paused from step 1 to step 3; the command reports the longest
pause it saw.  An old owner that does not answer step 1 (its node is gone)
is skipped: the fence of step 2 makes that safe.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from actors.partitions import PartitionMap, balance, spread
from actors.routing import map_channel, shard_name
from actors.shard.actor import shard_handles
from actors.shard.host import ShardSettings
from persistence import cluster as cluster_store
from server.cluster import listed_gateways, live_nodes, read_map

__all__ = ["CHUNK", "Cluster", "MoveReport"]

log = logging.getLogger("loadout.cluster")

#: Partitions handed over together.
CHUNK = 16
#: How long a shard may take to answer a control call here.
CALL_TIMEOUT = 30.0


@dataclass
class MoveReport:
    moved: int = 0
    chunks: int = 0
    #: The longest a partition waited, release to adopt (ms).
    max_pause_ms: float = 0.0
    created: list[int] = field(default_factory=list)
    retired: list[int] = field(default_factory=list)
    epoch: int = 0


class Cluster:
    """The cluster as an operator's command sees it: the map in PostgreSQL
    and the shard actors in Ray (``ray.init`` done by the caller)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        namespace: str,
        services_file: str | None = None,
        redis: aioredis.Redis | None = None,
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._namespace = namespace
        self._services_file = services_file

    async def map(self) -> PartitionMap:
        found = await read_map(self._pool)
        if found is None:
            raise RuntimeError("no cluster here yet: start `loadout serve` once first")
        return found

    def handle(self, shard: int, node: str | None = None) -> Any:
        """The shard's actor, made (on ``node`` if given) if it does not exist."""
        return shard_handles(
            [ShardSettings(shard=shard, database_url="", redis_url="")],
            namespace=self._namespace,
            detached=True,
            services_file=self._services_file,
            nodes={shard: node} if node else None,
        )[0]

    async def stats(self, shard: int) -> dict[str, Any] | None:
        import ray

        try:
            actor = ray.get_actor(shard_name(shard), namespace=self._namespace)
            result: dict[str, Any] = await asyncio.wait_for(actor.stats.remote(), 10)
            return result
        except Exception as exc:
            log.warning("shard %d did not answer: %r", shard, exc)
            return None

    # ------------------------------------------------------------ status

    async def status(self) -> dict[str, Any]:
        current = await self.map()
        load = current.load()
        nodes = [
            {
                "node": str(n["NodeID"]),
                "address": n.get("NodeManagerAddress"),
                "alive": bool(n.get("Alive")),
                "cpus": n.get("Resources", {}).get("CPU", 0),
            }
            for n in live_nodes()
        ]
        starts = dict(await self._pool.fetch("SELECT shard, epoch FROM shard_epochs"))
        shards = []
        for shard, stats in zip(
            current.shards(), await asyncio.gather(*map(self.stats, current.shards())), strict=True
        ):
            shards.append(
                {
                    "shard": shard,
                    "name": shard_name(shard),
                    "partitions": load[shard],
                    "answering": stats is not None,
                    "node": (stats or {}).get("node"),
                    "address": (stats or {}).get("address"),
                    "resident_users": (stats or {}).get("users"),
                    "flushes": (stats or {}).get("flushes"),
                    "restarts": max(0, int(starts.get(shard, 1)) - 1),
                }
            )
        gateways: list[dict[str, Any]] = []
        if self._redis is not None:
            try:
                gateways = await listed_gateways(self._redis)
            except Exception as exc:
                log.warning("could not read the gateways from Redis: %r", exc)
        return {
            "epoch": current.epoch,
            "partitions": current.partitions,
            "nodes": nodes,
            "gateways": gateways,
            "shards": shards,
        }

    # ------------------------------------------------------------ moves

    async def hand_over(self, moves: Mapping[int, int], report: MoveReport) -> None:
        """Move partitions to new shards, ``CHUNK`` at a time (module docstring)."""
        current = await self.map()
        order = sorted(moves)
        for start in range(0, len(order), CHUNK):
            chunk = {p: moves[p] for p in order[start : start + CHUNK]}
            began = time.perf_counter()
            sources: dict[int, list[int]] = defaultdict(list)
            for partition in chunk:
                sources[current.owners[partition]].append(partition)
            await asyncio.gather(*(self._release(s, parts) for s, parts in sources.items()))
            epoch = await cluster_store.move(self._pool, chunk)
            await self._announce(epoch)
            await asyncio.gather(*(self._adopt(s, epoch) for s in set(chunk.values())))
            pause = 1e3 * (time.perf_counter() - began)
            report.max_pause_ms = max(report.max_pause_ms, pause)
            report.moved += len(chunk)
            report.chunks += 1
            report.epoch = epoch
            current = await self.map()
            log.info("moved %d partitions in %.0f ms (map epoch %d)", len(chunk), pause, epoch)

    async def _announce(self, epoch: int) -> None:
        """Tell gateways to read the map now (else they learn within seconds)."""
        if self._redis is None:
            return
        try:
            await self._redis.publish(map_channel(), str(epoch))
        except Exception as exc:
            log.warning("could not announce map epoch %d: %r", epoch, exc)

    async def _release(self, shard: int, partitions: list[int]) -> None:
        try:
            await asyncio.wait_for(self.handle(shard).release.remote(partitions), CALL_TIMEOUT)
        except Exception as exc:  # gone: the map's fence keeps it from writing
            log.warning("shard %d did not hand over %s: %r", shard, partitions[:4], exc)

    async def _adopt(self, shard: int, epoch: int) -> None:
        try:
            await asyncio.wait_for(self.handle(shard).adopt.remote(epoch), CALL_TIMEOUT)
        except Exception as exc:  # it reads the map by itself within seconds
            log.warning("shard %d did not take map epoch %d now: %r", shard, epoch, exc)

    async def _start_new(self, count: int, report: MoveReport) -> list[int]:
        """Make ``count`` new shards, each on the live node hosting fewest."""
        current = await self.map()
        hosted: dict[str, int] = {str(n["NodeID"]): 0 for n in live_nodes()}
        for stats in await asyncio.gather(*map(self.stats, current.shards())):
            node = (stats or {}).get("node")
            if node in hosted:
                hosted[node] += 1
        new: list[int] = []
        for _ in range(count):
            node = min(hosted, key=lambda n: (hosted[n], n)) if hosted else None
            if node is not None:
                hosted[node] += 1
            new.append(await self._start_on(node, report, taken=new))
        return new

    async def _retire(self, shards: list[int], report: MoveReport) -> None:
        """Stop shards that own no partition any more."""
        import ray

        for shard in shards:
            try:
                actor = ray.get_actor(shard_name(shard), namespace=self._namespace)
                await asyncio.wait_for(actor.close.remote(), CALL_TIMEOUT)
                ray.kill(actor, no_restart=True)
            except Exception as exc:
                log.warning("shard %d could not be stopped cleanly: %r", shard, exc)
            report.retired.append(shard)

    async def scale(self, count: int) -> MoveReport:
        """Run ``count`` shards: make or retire shards and move partitions."""
        if count < 1:
            raise ValueError("a cluster needs at least one shard")
        report = MoveReport()
        current = await self.map()
        shards = current.shards()
        if count > len(shards):
            shards = shards + await self._start_new(count - len(shards), report)
        keep, leaving = shards[:count], shards[count:]
        await self.hand_over(balance(current.owners, keep), report)
        await self._retire(leaving, report)
        return report

    async def rebalance(self) -> MoveReport:
        """Spread shards over the live nodes (replacing those on crowded or
        dead nodes), then even out the partitions between shards."""
        report = MoveReport()
        current = await self.map()
        shards = current.shards()
        stats = await asyncio.gather(*map(self.stats, shards))
        where = {s: (st or {}).get("node") for s, st in zip(shards, stats, strict=True)}
        plan = spread(where, [str(n["NodeID"]) for n in live_nodes()])
        for old, node in plan:
            new = await self._start_on(node, report)
            moves = {p: new for p, s in enumerate((await self.map()).owners) if s == old}
            await self.hand_over(moves, report)
            await self._retire([old], report)
        current = await self.map()
        await self.hand_over(balance(current.owners, current.shards()), report)
        return report

    async def _start_on(
        self, node: str | None, report: MoveReport, taken: list[int] | None = None
    ) -> int:
        """Start a shard with a number never used (so no fencing epoch is
        shared with an old one) on ``node``; its number."""
        current = await self.map()
        used = (
            set(current.shards())
            | set(taken or ())
            | {int(r["shard"]) for r in await self._pool.fetch("SELECT shard FROM shard_epochs")}
        )
        shard = next(s for s in range(len(used) + 1) if s not in used)
        await asyncio.wait_for(self.handle(shard, node).start.remote(), CALL_TIMEOUT * 2)
        report.created.append(shard)
        return shard
