"""Readiness (PROTOCOL.md §13): does this gateway have what it needs to serve?

``/healthz`` says the process is alive; ``/readyz`` says whether PostgreSQL,
Redis and the shard of every user answer, and names what does not.  The
dependencies are probed in the background once a second (each probe with a
short timeout), so that answering ``/readyz`` never waits on the network,
and the ``loadout_dependency_up`` gauge follows them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import asyncpg
import msgspec
import redis.asyncio as aioredis

from server.metrics import Metrics

__all__ = ["Readiness"]

log = logging.getLogger("loadout.readiness")

PROBE_SECONDS = 1.0
PROBE_TIMEOUT = 1.0


class Linked(Protocol):
    """A shard batcher as readiness sees it."""

    shard: int

    @property
    def linked(self) -> bool: ...


class Report(msgspec.Struct):
    ready: bool
    down: list[str]
    dependencies: dict[str, str]


_encoder = msgspec.json.Encoder()


class Readiness:
    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        shards: Sequence[Linked],
        metrics: Metrics,
    ) -> None:
        self._probes: dict[str, Callable[[], Awaitable[object]]] = {
            "postgresql": lambda: pool.fetchval("SELECT 1"),
            "redis": redis.ping,
        }
        self._shards = shards
        self._metrics = metrics
        self._state: dict[str, bool] = dict.fromkeys(self._probes, False)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.probe()
        self._task = asyncio.create_task(self._run(), name="readiness")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(PROBE_SECONDS)
            await self.probe()

    async def probe(self) -> None:
        """Probe every dependency now."""
        results = await asyncio.gather(
            *(asyncio.wait_for(probe(), PROBE_TIMEOUT) for probe in self._probes.values()),
            return_exceptions=True,
        )
        for name, result in zip(self._probes, results, strict=True):
            up = not isinstance(result, BaseException)
            if up != self._state.get(name):
                if up:
                    log.info("%s answers again", name)
                else:
                    log.warning("%s does not answer: %r", name, result)
            self._state[name] = up

    def report(self) -> Report:
        """Each dependency's state; the shards' are read from their links now."""
        states = dict(self._state)
        for batcher in self._shards:
            states[f"shard {batcher.shard}"] = batcher.linked
        for name, up in states.items():
            self._metrics.dependency_up.labels(name).set(1 if up else 0)
        down = [name for name, up in states.items() if not up]
        return Report(
            ready=not down,
            down=down,
            dependencies={name: "up" if up else "down" for name, up in states.items()},
        )

    def body(self) -> tuple[bool, bytes]:
        """Ready or not, and the JSON body ``/readyz`` answers."""
        report = self.report()
        return report.ready, _encoder.encode(report) + b"\n"
