"""The embedded default's Ray: a local instance on loopback only, its files
under the data directory, its processes recorded so that none outlives the
server (``server/reaper.py``); or a connection to the cluster ``RAY_ADDRESS``
names."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from server import cluster
from server.config import Settings
from server.reaper import stop_recorded
from server.services import note_service

__all__ = ["ray_temp_dir", "record_ray_processes", "start_ray", "start_reaper"]

log = logging.getLogger("loadout.server")


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
    note_service(settings.data_dir, "ray_address", ray.get_runtime_context().gcs_address)
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
