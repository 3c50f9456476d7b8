"""``loadout serve``: start what is needed, serve, and drain on SIGTERM.

Start-up, in order: the embedded PostgreSQL and Redis when no URLs are
configured (each a child process that dies with us), Ray (a local instance
unless ``RAY_ADDRESS`` names a cluster), schema migrations, the demo catalog
when none was ever published, the shard actors, then the WebSocket listener.
Shutdown (SIGTERM or Ctrl-C) runs the other way: stop accepting, answer what
is in flight, flush the journals, close connections, stop what we started.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import signal
from typing import Any, Protocol

import asyncpg
import redis.asyncio as aioredis

from actors.catalog import Catalog, demo_catalog_text
from actors.catalog_source import load_live_catalog, publish_catalog_text
from actors.routing import STOCK_LEFT_KEY
from actors.shard.host import ShardSettings
from persistence import store
from persistence.embedded import EmbeddedPostgres, EmbeddedRedis
from persistence.orders import order_owner
from persistence.schema import migrate
from server import cluster
from server.admission import connection_limit
from server.batching import Backend, ShardBatcher
from server.commerce import Commerce, CommerceSettings
from server.config import Settings
from server.gateway import Gateway, GatewayLimits
from server.http import HttpServer
from server.local_ray import record_ray_processes, start_ray, start_reaper
from server.metrics import Metrics
from server.pushes import PushFanout
from server.ratelimit import RateLimiter
from server.readiness import Readiness
from server.router import ShardRouter
from server.services import Services, read_services, services_file, start_services
from server.shard_metrics import follow_shards
from server.supervision import Supervisor, lock_data_dir
from server.workers import WorkerGroup

__all__ = ["BackendFactory", "CatalogHolder", "Services", "read_services", "run_server"]

log = logging.getLogger("loadout.server")


class CatalogHolder:
    """The gateway's copy of the live catalog."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.catalog = Catalog.empty()
        #: Units left of limited items, as the shards last announced them.
        self.stock_left: dict[str, int] = {}

    async def refresh(self) -> bool:
        catalog = await load_live_catalog(self._pool)
        changed = catalog.version != self.catalog.version
        self.catalog = catalog
        return changed

    def current(self) -> Catalog:
        return self.catalog


class BackendFactory(Protocol):
    """Another core to serve under the gateway instead of the actor core: it
    gets what the gateway was started with and returns its ``Backend``
    started.  The benchmark's lock baseline plugs in here
    (``python -m bench.lock_server``), so that it can be measured behind the
    same gateway without being part of the product."""

    async def __call__(
        self, settings: Settings, services: Services, redis: aioredis.Redis, catalog: CatalogHolder
    ) -> Backend: ...


async def serve_async(
    settings: Settings,
    services: Services,
    stop: asyncio.Event,
    backend_factory: BackendFactory | None = None,
    metrics: Metrics | None = None,
    supervisor: Supervisor | None = None,
    workers: WorkerGroup | None = None,
) -> None:
    from actors.shard.actor import shard_handles

    pool = await store.open_pool(services.database_url)
    redis = aioredis.from_url(services.redis_url)
    try:
        await migrate(pool)
        published = await publish_catalog_text(pool, demo_catalog_text(), "demo", only_if_none=True)
        if published is not None:
            log.info("published the demo catalog as version %d", published)
        holder = CatalogHolder(pool)
        await holder.refresh()

        metrics = metrics or Metrics()
        handles: list[Any] = []
        shard_watch: asyncio.Task[None] | None = None
        backend: Backend
        if backend_factory is not None:
            backend = await backend_factory(settings, services, redis, holder)
        else:
            first = await cluster.join(pool, settings)

            def shard_settings(shard: int) -> ShardSettings:
                return ShardSettings(
                    shard=shard,
                    database_url=services.database_url,
                    redis_url=services.redis_url,
                    starting_balance=settings.starting_balance,
                    idle_seconds=settings.idle_seconds,
                    flush_interval=settings.flush_interval_ms / 1000,
                )

            def handle_of(shard: int) -> Any:
                """The shard actor by name (made if missing: new, or killed for good)."""
                return shard_handles(
                    [shard_settings(shard)],
                    namespace=settings.ray_namespace,
                    detached=not services.ray_local,
                    log_level=logging.getLevelName(settings.log_level),
                    services_file=str(services_file(settings.data_dir).resolve()),
                    nodes=cluster.place([shard]),
                )[0]

            handles = [handle_of(shard) for shard in first.shards()]
            for handle in handles:
                await handle.start.remote()
            if services.ray_local:
                record_ray_processes(settings.data_dir, {c.pid or 0 for c in services.embedded})
                start_reaper(settings.data_dir)

            def resolve(shard: int) -> Any:
                """A shard's actor again, unless the map has retired it (then
                making it would leave an actor no one uses)."""
                if shard not in router.map.owners:
                    raise LookupError(f"shard {shard} is no longer in the map")
                return handle_of(shard)

            def make_batcher(shard: int) -> ShardBatcher:
                return ShardBatcher(
                    shard,
                    handle_of(shard),
                    lambda: holder.catalog.version,
                    on_batch=metrics.batches.observe,
                    resolve=functools.partial(resolve, shard),
                )

            router = ShardRouter(
                first, make_batcher, functools.partial(cluster.read_map, pool), metrics.pauses
            )
            await router.start(wait=60.0)
            shard_watch = asyncio.create_task(follow_shards(router, handle_of, metrics))
            backend = router
        limiter = RateLimiter(settings.rate_per_second, settings.rate_burst)
        limits = GatewayLimits(
            handshake_timeout=settings.handshake_timeout,
            idle_timeout=settings.connection_idle_timeout,
            bad_frames=settings.max_bad_frames,
            per_address=settings.max_connections_per_ip,
            watch=settings.max_watch,
        )
        gateway = Gateway(
            settings.secret, backend, holder.current, limiter, settings.max_connections, metrics,
            limits,
        )  # fmt: skip

        async def catalog_changed(version: int) -> None:
            if version > holder.catalog.version and await holder.refresh():
                log.info("catalog version %d is live", holder.catalog.version)
                gateway.broadcast_catalog_changed(holder.catalog.version)

        def stock_changed(sku: str, left: int) -> None:
            holder.stock_left[sku] = left

        for sku, left in (await redis.hgetall(STOCK_LEFT_KEY)).items():
            holder.stock_left[sku.decode() if isinstance(sku, bytes) else sku] = int(left)
        gateway.stock_left = holder.stock_left
        router_of = backend if isinstance(backend, ShardRouter) else None
        fanout = PushFanout(
            redis, gateway.deliver, catalog_changed, stock_changed,
            router_of.refresh if router_of is not None else None,
        )  # fmt: skip
        await fanout.start()
        gateway.on_connection = fanout.watch
        gateway.on_disconnect = fanout.unwatch
        gateway.watches.subscriptions = fanout
        readiness = Readiness(pool, redis, getattr(backend, "batchers", []), metrics)
        await readiness.start()
        gateway.readiness = readiness.body
        commerce = Commerce(
            CommerceSettings.from_env(settings.data_dir), pool, backend, holder.current, metrics
        )
        gateway.order_owner = functools.partial(order_owner, pool)
        http = HttpServer(
            settings.host, settings.http_port, metrics=metrics.render, readiness=readiness.body,
            reuse_port=settings.reuse_port, routes=commerce.routes,
        )  # fmt: skip
        await http.start()
        commerce.start()
        await gateway.start(settings.host, settings.port, reuse_port=settings.reuse_port)
        from actors.shard.actor import tune_collector

        tune_collector()
        log.info(
            "operators' HTTP on http://%s:%d (/metrics, /readyz, /v1/webhooks/*)",
            settings.host, http.port,
        )  # fmt: skip
        log.info(
            "serving ws://%s:%d/v1/ws (%s, %d shards, catalog v%d)",
            settings.host, gateway.port, type(backend).__name__, len(handles),
            holder.catalog.version,
        )  # fmt: skip
        sweeper = asyncio.create_task(_sweep(limiter))
        listed = asyncio.create_task(
            cluster.announce_gateway(
                redis, f"{settings.host}:{gateway.port}", lambda: gateway.connections
            )
        )
        if workers is not None:
            await workers.start(gateway.port, http.port)
        await stop.wait()
        if workers is not None:
            workers.terminate()  # they drain beside us, while the shards still serve

        log.info("draining: no new connections; answering requests in flight")
        await gateway.stop_accepting()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(backend.drain(), 20)
        await gateway.close_all()
        if workers is not None:
            await workers.wait()
        sweeper.cancel()
        listed.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listed
        if shard_watch is not None:
            shard_watch.cancel()
        await commerce.close()
        await backend.close()
        await fanout.close()
        await http.close()
        await readiness.close()
        if services.ray_local:
            for handle in handles:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(handle.close.remote(), 20)
        log.info("drained")
    finally:
        await redis.aclose()
        await pool.close()


async def _sweep(limiter: RateLimiter) -> None:
    while True:
        await asyncio.sleep(30)
        limiter.sweep()


def run_server(
    settings: Settings,
    backend_factory: BackendFactory | None = None,
    *,
    uses_ray: bool = True,
    workers: int = 1,
) -> None:
    """Run until SIGTERM or SIGINT; stop everything started here.

    The actor core serves unless ``backend_factory`` builds another core;
    ``uses_ray=False`` (a core that needs no Ray) starts no Ray.  With
    ``workers`` above 1, this process serves beside ``workers - 1`` gateway
    worker processes on the same ports (server/workers.py)."""
    import uvloop

    settings = settings.with_secret()
    if workers > 1:
        settings = dataclasses.replace(settings, reuse_port=True)
    group = WorkerGroup(settings, workers) if workers > 1 else None
    # A server that starts services of its own owns its data directory: taken
    # before anything is started or cleaned up there.
    lock = lock_data_dir(settings.data_dir) if settings.embedded else None
    settings = dataclasses.replace(
        settings, max_connections=connection_limit(settings.max_connections)
    )
    services = start_services(settings)
    metrics = Metrics()
    supervisor = Supervisor(
        {_EMBEDDED_NAMES[type(child)]: child for child in services.embedded},
        on_restart=lambda name: metrics.restarts.labels(name).inc(),
    )
    supervisor.start()
    try:
        if uses_ray:
            services.ray_local = start_ray(settings)

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await serve_async(settings, services, stop, backend_factory, metrics, supervisor, group)

        uvloop.run(main())
    finally:
        import ray

        supervisor.stop()
        if ray.is_initialized():
            ray.shutdown()
        services.stop()
        if lock is not None:
            os.close(lock)
        log.info("stopped")


#: How the supervisor, the metrics and ``/readyz`` name the embedded services.
_EMBEDDED_NAMES: dict[type, str] = {EmbeddedPostgres: "postgresql", EmbeddedRedis: "redis"}
