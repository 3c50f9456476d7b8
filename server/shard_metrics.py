"""Per-shard figures on a gateway's ``/metrics``, labelled with the shard and
its Ray node (PROTOCOL.md §13): read from each shard's ``stats`` every
``PERIOD`` seconds, and this gateway's own batch counts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from server.metrics import Metrics
from server.router import ShardRouter

__all__ = ["PERIOD", "follow_shards"]

log = logging.getLogger("loadout.metrics")

PERIOD = 10.0


async def follow_shards(
    router: ShardRouter, handle_of: Callable[[int], Any], metrics: Metrics
) -> None:
    """Runs until cancelled."""
    shown: dict[int, str] = {}
    gauges = (
        metrics.shard_users, metrics.shard_partitions, metrics.shard_flushes,
        metrics.shard_flush_p99,
    )  # fmt: skip
    while True:
        metrics.map_epoch.set(router.map.epoch)
        load = router.map.load()
        for batcher in router.batchers:
            metrics.shard_batches.labels(str(batcher.shard)).set(batcher.batches)
        for shard in router.map.shards():
            try:
                stats = await asyncio.wait_for(handle_of(shard).stats.remote(), 5)
            except Exception as exc:
                log.debug("shard %d gave no stats: %r", shard, exc)
                continue
            node = str(stats.get("node") or "")
            if shown.get(shard, node) != node:  # moved to another node
                for gauge in gauges:
                    gauge.remove(str(shard), shown[shard])
            shown[shard] = node
            labels = (str(shard), node)
            metrics.shard_users.labels(*labels).set(stats.get("users", 0))
            metrics.shard_partitions.labels(*labels).set(load[shard])
            metrics.shard_flushes.labels(*labels).set(stats.get("flushes", 0))
            metrics.shard_flush_p99.labels(*labels).set(stats.get("flush_p99_ms", 0) / 1e3)
        for shard in set(shown) - set(router.map.shards()):  # retired
            for gauge in gauges:
                gauge.remove(str(shard), shown[shard])
            metrics.shard_batches.remove(str(shard))
            del shown[shard]
        await asyncio.sleep(PERIOD)
