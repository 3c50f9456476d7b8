"""The services a server uses (PostgreSQL, Redis), the embedded ones it
starts when none is configured, and the services file that tells the
server's other processes (gateway workers, shard actors on this machine,
operators' commands) where they are: ``<data dir>/run/services.json``, mode
0600 (it holds the database URL)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persistence.embedded import EmbeddedPostgres, EmbeddedRedis
from server.config import Settings

__all__ = ["Services", "note_service", "read_services", "services_file", "start_services"]

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


def services_file(data_dir: Path) -> Path:
    return data_dir / "run" / "services.json"


def note_service(data_dir: Path, name: str, value: str) -> None:
    """Add an address to the services file (for the operator's commands)."""
    _write_services(data_dir, {**(read_services(data_dir) or {}), name: value})


def _write_services(data_dir: Path, values: dict[str, Any]) -> None:
    """Written aside and renamed, mode 0600: gateway workers may read it meanwhile."""
    path = services_file(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.name}.{os.getpid()}")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(values, f)
    staging.replace(path)


def read_services(data_dir: Path) -> dict[str, Any] | None:
    """The URLs of the embedded services of a server running on ``data_dir``."""
    try:
        value = json.loads(services_file(data_dir).read_text())
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
    _write_services(
        settings.data_dir,
        {"database_url": services.database_url, "redis_url": services.redis_url},
    )
    return services
