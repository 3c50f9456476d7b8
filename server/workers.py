"""``loadout serve --workers N``: N gateway processes on one port (PROTOCOL.md §13).

The first process, the supervisor, is ``loadout serve`` as ever: it starts
the embedded PostgreSQL and Redis that are not configured, starts Ray (or
joins ``RAY_ADDRESS``), makes the shard actors and serves.  Once it
listens, it starts N-1 workers, each ``loadout serve --worker`` in a child
process, that

* listen on the same WebSocket and HTTP ports: every process binds them with
  ``SO_REUSEPORT``, and the kernel spreads new connections among them;
* join the same Ray cluster, in the same namespace (the supervisor's own
  ``RAY_ADDRESS``, else the GCS address of its local Ray), so they use the
  same shard actors;
* use the same PostgreSQL and Redis: the configured URLs, else the ones in
  ``<data dir>/run/services.json``, which the supervisor wrote.

A change made through one process reaches the user's connections on the
others as every push does, through Redis.

The supervisor starts a worker again when it dies, and on SIGTERM or SIGINT
stops them (SIGTERM, their graceful drain) before it closes the shards; a
worker gets SIGTERM when the supervisor dies, however it dies
(``PR_SET_PDEATHSIG``, Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from server.config import ConfigError, Settings

__all__ = ["WorkerGroup", "worker_settings"]

log = logging.getLogger("loadout.workers")

#: How often the workers are looked at; the wait before starting again one
#: that died soon after it started (doubling up to the cap).
CHECK_SECONDS = 0.5
RETRY_SECONDS = 1.0
RETRY_MAX_SECONDS = 10.0
#: A worker that lived this long is healthy: its next death is retried at once.
HEALTHY_SECONDS = 30.0
#: How long the workers have to drain before they are killed.
STOP_SECONDS = 60.0

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def worker_settings(settings: Settings) -> Settings:
    """A worker's settings: the supervisor's services, the shared ports.

    The database and Redis are the configured ones, else those the
    supervisor runs (``<data dir>/run/services.json``): a worker starts no
    service of its own and never takes the data directory's lock."""
    from server.app import read_services

    running = read_services(settings.data_dir) or {}
    settings = dataclasses.replace(
        settings,
        database_url=settings.database_url or running.get("database_url") or None,
        redis_url=settings.redis_url or running.get("redis_url") or None,
        reuse_port=True,
    )
    if settings.embedded:
        raise ConfigError(
            f"a worker needs its supervisor's PostgreSQL, Redis and Ray, and"
            f" {settings.data_dir}/run/services.json or RAY_ADDRESS does not name them"
        )
    return settings


def _dies_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn``: the child gets SIGTERM when this process dies."""
    if sys.platform != "linux":
        return None
    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return arm


@dataclasses.dataclass
class _Slot:
    """One worker's place: its process now, and when to start it again."""

    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    due: float = 0.0
    wait: float = RETRY_SECONDS


class WorkerGroup:
    """The supervisor's N-1 worker processes (the supervisor is the Nth)."""

    def __init__(self, settings: Settings, count: int) -> None:
        self._settings = settings
        self._slots = [_Slot() for _ in range(count - 1)]
        self._env: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None
        self.restarts = 0

    @property
    def pids(self) -> list[int]:
        """The workers' pids now (not the supervisor's)."""
        return [s.process.pid for s in self._slots if s.process and s.process.poll() is None]

    async def start(self, port: int, http_port: int) -> None:
        """Start the workers on the ports the supervisor bound (which may
        have been configured as 0), and watch them."""
        self._env = self._environment(port, http_port)
        for slot in self._slots:
            self._spawn(slot)
        log.info("started %d gateway workers on port %d: pids %s",
                 len(self._slots), port, self.pids)  # fmt: skip
        self._task = asyncio.create_task(self._watch(), name="workers")

    def _environment(self, port: int, http_port: int) -> dict[str, str]:
        """The supervisor's environment (Ray's authentication mode and
        token included), with the ports it bound and its Ray cluster."""
        import ray

        env = dict(os.environ)
        env.update(LOADOUT_PORT=str(port), LOADOUT_HTTP_PORT=str(http_port),
                   LOADOUT_RAY_NAMESPACE=self._settings.ray_namespace)  # fmt: skip
        address = self._settings.ray_address
        if address is None and ray.is_initialized():
            address = ray.get_runtime_context().gcs_address
        if address:
            env["RAY_ADDRESS"] = address
        return env

    def _spawn(self, slot: _Slot) -> None:
        slot.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--worker"],
            env=self._env,
            stdin=subprocess.DEVNULL,
            process_group=0,  # Ctrl-C reaches the supervisor, which stops us in order
            preexec_fn=_dies_with_parent(),
        )
        slot.started = time.monotonic()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(CHECK_SECONDS)
            now = time.monotonic()
            for slot in self._slots:
                process = slot.process
                if process is None or process.poll() is None:
                    if process is None and now >= slot.due:
                        self._spawn(slot)
                        self.restarts += 1
                    continue
                if now - slot.started > HEALTHY_SECONDS:
                    slot.due, slot.wait = now, RETRY_SECONDS
                else:  # it dies as it starts: wait longer each time
                    slot.due, slot.wait = now + slot.wait, min(slot.wait * 2, RETRY_MAX_SECONDS)
                log.error("gateway worker %d exited with %s; starting it again",
                          process.pid, process.returncode)  # fmt: skip
                slot.process = None

    def terminate(self) -> None:
        """Stop watching, and ask every worker to drain and stop (SIGTERM)."""
        if self._task is not None:
            self._task.cancel()
        for slot in self._slots:
            if slot.process is not None and slot.process.poll() is None:
                slot.process.send_signal(signal.SIGTERM)

    async def wait(self) -> None:
        """Wait for the workers to stop; kill those still draining after
        ``STOP_SECONDS``."""
        deadline = time.monotonic() + STOP_SECONDS
        for slot in self._slots:
            process = slot.process
            if process is None:
                continue
            try:
                await asyncio.to_thread(process.wait, max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("gateway worker %d did not drain in time; killing it", process.pid)
                process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(5)
