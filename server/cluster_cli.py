"""``loadout cluster status|scale|rebalance`` (PROTOCOL.md §13): the
operator's view of the cluster and the live moves (``server.scaling``).

They talk to the running cluster: its PostgreSQL (``LOADOUT_DATABASE_URL``,
else the server running on ``LOADOUT_DATA_DIR``) and its Ray cluster
(``RAY_ADDRESS``, else that server's local Ray), in ``LOADOUT_RAY_NAMESPACE``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import Any

from server.config import Settings

__all__ = ["register"]

_ENV = """
Reads LOADOUT_DATABASE_URL and RAY_ADDRESS (else the server running on
LOADOUT_DATA_DIR, default .loadout), LOADOUT_RAY_NAMESPACE, and RAY_AUTH_MODE
for a cluster started with `ray start`.
"""


def register(commands: Any) -> None:
    top = commands.add_parser(
        "cluster",
        help="see and scale the cluster",
        description=_ENV,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = top.add_subparsers(dest="cluster_command", required=True)
    status = sub.add_parser("status", help="nodes, shards, partitions, the map's epoch")
    status.add_argument("--json", action="store_true", help="as one JSON object")
    status.set_defaults(run=_cmd)
    scale = sub.add_parser("scale", help="run N shards, moving partitions live")
    scale.add_argument("shards", type=int, metavar="N")
    scale.add_argument("--wait", action="store_true", help="(moves always complete before exit)")
    scale.set_defaults(run=_cmd)
    rebalance = sub.add_parser("rebalance", help="spread shards and partitions over live nodes")
    rebalance.add_argument("--wait", action="store_true", help="(as for scale)")
    rebalance.set_defaults(run=_cmd)


def _cmd(settings: Settings, args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(settings, args))
    except _Unreachable as exc:
        print(f"loadout cluster: {exc}", file=sys.stderr)
        return 2


class _Unreachable(Exception):
    pass


def _addresses(settings: Settings) -> tuple[str, str, str | None]:
    """The database, Ray and (if known) Redis: configured, else the running server's."""
    from server.services import read_services

    found = read_services(settings.data_dir) or {}
    database = settings.database_url or str(found.get("database_url") or "")
    ray_address = settings.ray_address or str(found.get("ray_address") or "")
    redis_url = settings.redis_url or str(found.get("redis_url") or "") or None
    if not database:
        raise _Unreachable(f"no running server on {settings.data_dir} and no LOADOUT_DATABASE_URL")
    if not ray_address:
        raise _Unreachable(f"no running server on {settings.data_dir} and no RAY_ADDRESS")
    return database, ray_address, redis_url


async def _run(settings: Settings, args: argparse.Namespace) -> int:
    database, ray_address, redis_url = _addresses(settings)
    from server.cluster import loopback_ray

    loopback_ray(ray_address)
    if not settings.ray_address:
        # A local Ray started by `loadout serve` has token authentication on
        # (Ray's default for a new cluster), with the token in Ray's default place.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray
    import redis.asyncio as aioredis

    from persistence.store import open_pool
    from server.scaling import Cluster

    try:
        pool = await open_pool(database)
    except Exception as exc:
        raise _Unreachable(f"cannot reach the database: {exc}") from None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(
            address=ray_address,
            namespace=settings.ray_namespace,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    except Exception as exc:
        await pool.close()
        raise _Unreachable(f"cannot reach Ray at {ray_address}: {exc}") from None
    redis = aioredis.from_url(redis_url) if redis_url else None
    try:
        services = settings.data_dir / "run" / "services.json"
        cluster = Cluster(
            pool,
            settings.ray_namespace,
            str(services.resolve()) if services.exists() else None,
            redis,
        )
        if args.cluster_command == "status":
            report = await cluster.status()
            print(json.dumps(report, indent=2) if args.json else _table(report))
            return 0 if all(s["answering"] for s in report["shards"]) else 1
        if args.cluster_command == "scale":
            done = await cluster.scale(args.shards)
        else:
            done = await cluster.rebalance()
        print(
            f"moved {done.moved} partitions in {done.chunks} steps (longest pause"
            f" {done.max_pause_ms:.0f} ms); new shards {done.created or 'none'},"
            f" retired {done.retired or 'none'}; map epoch {done.epoch or '(unchanged)'}"
        )
        return 0
    finally:
        if redis is not None:
            await redis.aclose()
        await pool.close()
        ray.shutdown()


def _table(report: dict[str, Any]) -> str:
    lines = [f"map epoch {report['epoch']}, {report['partitions']} partitions", "", "nodes:"]
    for n in report["nodes"]:
        lines.append(f"  {n['node'][:12]}  {n['address']}  alive={n['alive']}  cpus={n['cpus']}")
    lines += ["", "gateways:"]
    for g in report.get("gateways", []):
        lines.append(f"  {g['address']}  pid {g['pid']}  connections {g['connections']}")
    lines += ["", "shards:"]
    for s in report["shards"]:
        node = (s["node"] or "?")[:12]
        state = "ok" if s["answering"] else "NOT ANSWERING"
        lines.append(
            f"  {s['name']:<18} node {node:<12} partitions {s['partitions']:>5}"
            f"  resident users {s['resident_users']}  restarts {s['restarts']}  {state}"
        )
    return "\n".join(lines)
