"""The shard actor: a named Ray actor hosting many users (a ``ShardHost``).

A user id maps to one shard by a stable hash, so every gateway process finds
the same actor by name.  Gateways ask it for its ``endpoint`` through Ray and
send their batches on a socket (``actors/shard/link.py``); Ray carries the
control calls.  The actor starts its host lazily on the first call, so a Ray
restart of a crashed actor (which re-runs only the constructor) comes back by
itself, taking a new epoch that fences out anything the old process still
had in flight.  A start that fails (the database not up yet) is retried with
backoff, and the next call tries again if every attempt failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import os
from typing import Any

import ray

from actors.routing import shard_name
from actors.saga import STEP_TIMEOUT, Answer, SagaStep
from actors.shard.host import ShardHost, ShardSettings
from actors.shard.link import Endpoint, LinkServer

__all__ = ["ShardActor", "shard_handles", "tune_collector"]

log = logging.getLogger("loadout.shard")

#: Attempts of one start, and the first wait between them (doubling, capped).
START_ATTEMPTS = 8
START_BACKOFF = 0.25
START_BACKOFF_MAX = 4.0
#: The exit code of a shard that was fenced out (``ShardActor._retire``).
RETIRED_EXIT_CODE = 3


def tune_collector() -> None:
    """Make the cycle collector's pauses rarer and shorter (gateway and shards).

    What start-up made (modules, Ray's and our own set-up) is frozen out of
    collections, so a full collection scans only what came later: in the
    gateway full collections fell from about 90 ms to 8 ms.  Collections start
    after 20,000 new objects instead of 700: each request makes dozens, and at
    the default the collector ran hundreds of times a second.  At 1,000
    requests/s offered, p99 fell from 44-76 ms to 34-45 ms over three A/B
    rounds (BENCHMARKS.md, "Pauses")."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 50)


def connections(settings: ShardSettings, services_file: str | None) -> ShardSettings:
    """Fill in the database and Redis URLs, which never travel in the actor's
    arguments (Ray keeps those in its control store, where passwords do not
    belong): from ``LOADOUT_DATABASE_URL`` and ``LOADOUT_REDIS_URL`` on this
    Ray node, else from the services file of a server on this machine (mode
    0600, ``<data dir>/run/services.json``).  Settings made in this process
    (tests) may carry them already."""
    database_url = settings.database_url or os.environ.get("LOADOUT_DATABASE_URL", "")
    redis_url = settings.redis_url or os.environ.get("LOADOUT_REDIS_URL", "")
    if (not database_url or not redis_url) and services_file:
        with contextlib.suppress(OSError, ValueError):
            with open(services_file) as f:
                found = json.load(f)
            database_url = database_url or str(found.get("database_url", ""))
            redis_url = redis_url or str(found.get("redis_url", ""))
    if not database_url or not redis_url:
        missing = "LOADOUT_DATABASE_URL" if not database_url else "LOADOUT_REDIS_URL"
        raise RuntimeError(f"shard {settings.shard}: {missing} is not set on this Ray node")
    return dataclasses.replace(settings, database_url=database_url, redis_url=redis_url)


class ShardActor:
    def __init__(
        self,
        settings: ShardSettings,
        log_level: int = logging.INFO,
        services_file: str | None = None,
    ) -> None:
        logging.basicConfig(
            level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        _run_at_normal_priority()
        settings = connections(settings, services_file)
        self._shard = settings.shard
        self._host = ShardHost(settings, self._call_shard)
        self._host.on_fenced = self._retire
        self._link = LinkServer(settings.shard, self._host.apply_batch)
        self._peers: dict[int, Any] = {}
        self._started: asyncio.Task[None] | None = None

    def _retire(self) -> None:
        """A newer owner took this shard's epoch: this process can never write
        again.  It closes its link, so that gateways stop sending here and look
        the shard up again, and exits; if it is still the named actor, Ray
        starts it again, and the new process takes a new epoch."""
        log.error(
            "shard %d was fenced out by a newer owner; closing the link and exiting", self._shard
        )

        async def leave() -> None:
            try:
                await asyncio.wait_for(self._link.close(), 2)
            finally:
                logging.shutdown()
                os._exit(RETIRED_EXIT_CODE)

        asyncio.get_running_loop().create_task(leave())

    async def _ready(self) -> ShardHost:
        started = self._started
        if started is None or _failed(started):
            # Never started, or every attempt of the last start failed: try again.
            started = self._started = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(started)
        return self._host

    async def _start(self) -> None:
        delay = START_BACKOFF
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                await self._host.start()
                break
            except Exception as exc:
                if attempt == START_ATTEMPTS:
                    log.error("shard %d did not start: %r", self._shard, exc)
                    raise
                log.warning(
                    "shard %d could not start (%r); retrying in %.2f s", self._shard, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, START_BACKOFF_MAX)
        tune_collector()

    async def start(self) -> dict[str, Any]:
        host = await self._ready()
        return host.stats()

    async def endpoint(self) -> Endpoint:
        """Where gateways send batches (``actors/shard/link.py``): this node's
        address, a port, and a token that changes with every restart."""
        await self._ready()
        host = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        return await self._link.start(host)

    async def apply_steps(self, catalog_version: int, steps: list[SagaStep]) -> list[Answer]:
        host = await self._ready()
        return await host.apply_steps(catalog_version, steps)

    async def release(self, partitions: list[int]) -> list[int]:
        """Hand these partitions over (``ShardHost.release``): returns those it had."""
        host = await self._ready()
        return await host.release(partitions)

    async def adopt(self, map_epoch: int) -> dict[str, Any]:
        """Read the partition map if it is newer than ours; our stats after."""
        host = await self._ready()
        if map_epoch > host.ownership.epoch:
            await host.reload_map()
        return await self.stats()

    async def _call_shard(
        self, shard: int, catalog_version: int, steps: list[SagaStep]
    ) -> list[Answer]:
        """Saga steps on the shard hosting an allowance: this one directly,
        another through Ray (found by name in this actor's namespace)."""
        if shard == self._shard:
            return await asyncio.wait_for(
                self._host.apply_steps(catalog_version, steps), STEP_TIMEOUT
            )
        peer = self._peers.get(shard)
        if peer is None:
            namespace = ray.get_runtime_context().namespace
            peer = self._peers[shard] = ray.get_actor(shard_name(shard), namespace=namespace)
        try:
            result: list[Answer] = await asyncio.wait_for(
                peer.apply_steps.remote(catalog_version, steps), STEP_TIMEOUT
            )
        except Exception:
            self._peers.pop(shard, None)  # retired, or restarted: look it up again
            raise
        return result

    async def stats(self) -> dict[str, Any]:
        host = await self._ready()
        where: dict[str, Any] = {}
        if ray.is_initialized():  # (not when a test drives the actor directly)
            where = {
                "node": ray.get_runtime_context().get_node_id(),
                "address": ray.util.get_node_ip_address(),  # type: ignore[no-untyped-call]
            }
        return {**host.stats(), "pid": os.getpid(), **where}

    async def close(self) -> None:
        await self._link.close()
        started = self._started
        if started is not None and started.done() and not _failed(started):
            await self._host.close()


def _failed(task: asyncio.Task[None]) -> bool:
    return task.done() and (task.cancelled() or task.exception() is not None)


def _run_at_normal_priority() -> None:
    """Ray starts workers at niceness 15 (``RAY_worker_niceness``), under the
    gateways that feed them: on a small machine a shard then waits behind
    every other busy process.  Shards are the service, so run at 0 if allowed."""
    try:
        # Niceness is per thread on Linux: renice every thread Ray made.
        for task in os.listdir("/proc/self/task"):
            if os.getpriority(os.PRIO_PROCESS, int(task)) > 0:
                os.setpriority(os.PRIO_PROCESS, int(task), 0)
    except (OSError, AttributeError):
        logging.getLogger("loadout.shard").warning(
            "shard runs at niceness %s: set RAY_worker_niceness=0 on the Ray nodes",
            os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else "?",
        )


def shard_handles(
    settings: list[ShardSettings],
    *,
    namespace: str | None,
    detached: bool,
    log_level: int = logging.INFO,
    services_file: str | None = None,
    nodes: dict[int, str] | None = None,
) -> list[Any]:
    """Get or create the named shard actors (``num_cpus=0``: they mostly wait
    on I/O, and a 2-core machine can still host several).  The settings'
    URLs are left out of the actors' arguments (``connections``).  A shard
    made here goes to its node in ``nodes`` if given."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(ShardActor)
    handles = []
    for s in settings:
        s = dataclasses.replace(s, database_url="", redis_url="")
        options: dict[str, Any] = {
            "name": shard_name(s.shard),
            "get_if_exists": True,
            "num_cpus": 0,
            "max_restarts": -1,
            "max_task_retries": 0,
            "max_concurrency": 1000,
        }
        if namespace:
            options["namespace"] = namespace
        if detached:
            options["lifetime"] = "detached"
        node = (nodes or {}).get(s.shard)
        if node is not None:
            # Hard: Ray's soft affinity often placed shards elsewhere.  A shard
            # whose node dies then fails for good, and the next lookup by name
            # makes it again on a live node (``server.cluster.place``).
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
        handles.append(remote.options(**options).remote(s, log_level, services_file))
    return handles
