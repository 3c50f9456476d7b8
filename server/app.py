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
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import redis.asyncio as aioredis

from actors.catalog import Catalog, demo_catalog_text
from actors.catalog_source import load_live_catalog, publish_catalog_text
from actors.routing import STOCK_LEFT_KEY
from actors.shard.host import ShardSettings
from persistence import store
from persistence.embedded import EmbeddedPostgres, EmbeddedRedis
from persistence.schema import migrate
from server import cluster
from server.admission import FD_HEADROOM, raise_fd_limit
from server.batching import Backend, ShardBatcher
from server.config import Settings
from server.gateway import Gateway, GatewayLimits
from server.http import HttpServer
from server.metrics import Metrics
from server.pushes import PushFanout
from server.ratelimit import RateLimiter
from server.readiness import Readiness
from server.reaper import stop_recorded
from server.router import ShardRouter
from server.shard_metrics import follow_shards
from server.supervision import Supervisor, lock_data_dir
from server.workers import WorkerGroup

__all__ = ["BackendFactory", "CatalogHolder", "Services", "read_services", "run_server"]

log = logging.getLogger("loadout.server")


@dataclass
class Services:
    """The database, Redis and Ray this process uses, and what it started."""

    database_url: str
    redis_url: str
    embedded: list[EmbeddedPostgres | EmbeddedRedis] = field(default_factory=list)
    ray_local: bool = False

    def stop(self) -> None:
        for child in reversed(self.embedded):
            try:
                child.stop()
            except Exception:
                log.exception("could not stop %s", type(child).__name__)
        self.embedded.clear()


def _services_file(data_dir: Path) -> Path:
    return data_dir / "run" / "services.json"


def _note_service(data_dir: Path, name: str, value: str) -> None:
    """Add an address to the services file (for the operator's commands)."""
    found = read_services(data_dir) or {}
    found[name] = value
    path = _services_file(data_dir)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(found, f)


def read_services(data_dir: Path) -> dict[str, Any] | None:
    """The URLs of the embedded services of a server running on ``data_dir``."""
    try:
        value = json.loads(_services_file(data_dir).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def start_services(settings: Settings) -> Services:
    """Start the embedded PostgreSQL/Redis that are not configured (main thread)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    services = Services(settings.database_url or "", settings.redis_url or "")
    try:
        if not settings.database_url:
            pg = EmbeddedPostgres(settings.data_dir)
            services.database_url = pg.start()
            services.embedded.append(pg)
        if not settings.redis_url:
            rd = EmbeddedRedis(settings.data_dir)
            services.redis_url = rd.start()
            services.embedded.append(rd)
    except BaseException:
        services.stop()
        raise
    path = _services_file(settings.data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed: gateway workers may read it meanwhile.
    staging = path.with_name(f"{path.name}.{os.getpid()}")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"database_url": services.database_url, "redis_url": services.redis_url}, f)
    staging.replace(path)
    return services


def _ray_processes_file(data_dir: Path) -> Path:
    return data_dir / "run" / "ray-processes.json"


def record_ray_processes(data_dir: Path, exclude: set[int]) -> None:
    """Note the processes of our local Ray instance (pid and start time), so
    that the next start can stop any a ``kill -9`` of this one left behind."""
    import psutil

    me = psutil.Process()
    found = [
        [p.pid, p.create_time()]
        for p in me.children(recursive=True)
        if p.pid not in exclude and p.is_running()
    ]
    _ray_processes_file(data_dir).write_text(json.dumps(found))


def stop_leftover_ray(data_dir: Path) -> None:
    """Stop processes of a previous local Ray instance still alive (by pid,
    and only if the start time matches: a reused pid is never touched)."""
    stop_recorded(_ray_processes_file(data_dir))


def start_reaper(data_dir: Path) -> None:
    """A process of its own that stops the local Ray's processes if this
    server dies without stopping them (``server/reaper.py``)."""
    subprocess.Popen(
        [sys.executable, "-m", "server.reaper", str(os.getpid()),
         str(_ray_processes_file(data_dir).resolve())],
        stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


#: Ray keeps Unix sockets under its temporary directory; sun_path holds 107
#: bytes, and the session's own part of the path takes about 65 of them.
_RAY_SOCKET_SUFFIX = len("/session_2026-12-02_08-33-21_348879_27311/sockets/plasma_store")


def start_ray(settings: Settings) -> bool:
    """Connect to the configured Ray cluster or start a local one; True if local.

    A local Ray is the embedded default, so it listens on loopback only and
    keeps its files under the data directory: Ray is not safe on an
    untrusted network.  On Linux Ray uses the machine's address unless told
    it is not a cluster (the variable below, read when Ray is imported)."""
    cluster.loopback_ray(settings.ray_address)
    if not settings.ray_address:
        # Ray turns token authentication on for a new local cluster and warns
        # at every start that it did: say so explicitly (read at import).
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if settings.ray_address:
        ray.init(
            address=settings.ray_address,
            namespace=settings.ray_namespace,
            logging_level=logging.WARNING,
        )
        return False
    stop_leftover_ray(settings.data_dir)
    ray.init(
        address="local",
        namespace=settings.ray_namespace,
        num_cpus=max(2, os.cpu_count() or 2),
        include_dashboard=False,
        logging_level=logging.WARNING,
        _temp_dir=str(ray_temp_dir(settings.data_dir)),
    )
    _note_service(settings.data_dir, "ray_address", ray.get_runtime_context().gcs_address)
    address = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
    if address not in ("127.0.0.1", "::1"):
        log.warning(
            "the local Ray listens on %s, not loopback only (Ray imported too early)", address
        )
    return True


def ray_temp_dir(data_dir: Path) -> Path:
    """``<data dir>/ray`` if Ray's sockets fit under it; else a private
    temporary directory, named in ``<data dir>/ray`` (a symbolic link)."""
    home = data_dir.resolve() / "ray"
    if len(os.fsencode(home)) + _RAY_SOCKET_SUFFIX < 107:
        if home.is_symlink():
            home.unlink()
        home.mkdir(mode=0o700, exist_ok=True)
        return home
    target = home.readlink() if home.is_symlink() else None
    if target is None or not target.is_dir():
        if home.is_symlink():
            home.unlink()
        target = Path(tempfile.mkdtemp(prefix="loadout-ray-"))
        home.symlink_to(target, target_is_directory=True)
        log.info("Ray's files are in %s (a path under the data directory is too long)", target)
    return target


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
                    services_file=str(_services_file(settings.data_dir).resolve()),
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
        http = HttpServer(
            settings.host, settings.http_port, metrics=metrics.render, readiness=readiness.body,
            reuse_port=settings.reuse_port,
        )  # fmt: skip
        await http.start()
        await gateway.start(settings.host, settings.port, reuse_port=settings.reuse_port)
        from actors.shard.actor import tune_collector

        tune_collector()
        log.info("operators' HTTP on http://%s:%d (/metrics, /readyz)", settings.host, http.port)
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
    raise_fd_limit(settings.max_connections + FD_HEADROOM)
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
