"""``loadout serve`` owns what it starts (DESIGN.md, "Supervision").

* **One server per data directory.**  ``lock_data_dir`` takes an exclusive
  ``flock`` on ``<data dir>/run/serve.lock`` before anything is started or
  cleaned up, and writes our pid there.  A second ``loadout serve`` on the
  same directory refuses to start and names the first one's pid, instead of
  taking its embedded PostgreSQL, Redis and Ray for leftovers.  The kernel
  drops the lock when the process dies, however it dies.
* **Embedded services come back.**  ``Supervisor`` watches the embedded
  PostgreSQL and Redis from a thread of its own and starts again whichever
  has died, on the same socket: the connection pools, the shards' journals
  and the push listener reconnect by themselves.  The thread lives as long
  as the server, which matters: a child started from it gets the parent-death
  signal when *that thread* ends (persistence.embedded).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

__all__ = ["DataDirInUse", "Supervisor", "lock_data_dir"]

log = logging.getLogger("loadout.supervisor")

#: How often the embedded services are looked at, and the wait before a
#: restart that failed is tried again (doubling up to the cap).
CHECK_SECONDS = 0.25
RETRY_SECONDS = 0.5
RETRY_MAX_SECONDS = 5.0


class DataDirInUse(Exception):
    """Another ``loadout serve`` holds this data directory."""


def lock_data_dir(data_dir: Path) -> int:
    """Take the data directory for this process; return the lock's descriptor,
    to be kept open for as long as the server runs."""
    run = data_dir / "run"
    run.mkdir(parents=True, exist_ok=True)
    path = run / "serve.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise DataDirInUse(
            f"data directory {data_dir.resolve()} is in use by pid {holder}"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Embedded(Protocol):
    """An embedded service as the supervisor sees it (persistence.embedded)."""

    @property
    def pid(self) -> int | None: ...

    def start(self) -> str: ...


class Supervisor:
    """Restarts embedded services that died, until ``stop``."""

    def __init__(
        self,
        services: dict[str, Embedded],
        on_restart: Callable[[str], None] = lambda name: None,
    ) -> None:
        self._services = services
        self._on_restart = on_restart
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self.restarts: dict[str, int] = dict.fromkeys(services, 0)
        #: Services down right now (the readiness check reads it).
        self.down: set[str] = set()

    def start(self) -> None:
        if self._services:
            self._thread.start()

    def stop(self) -> None:
        """Stop restarting (before the services are stopped for good)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        waits = dict.fromkeys(self._services, RETRY_SECONDS)
        due = dict.fromkeys(self._services, 0.0)
        while not self._stopping.wait(CHECK_SECONDS):
            for name, service in self._services.items():
                if service.pid is not None:
                    continue
                now = time.monotonic()
                if name not in self.down:
                    log.error("embedded %s died; starting it again", name)
                    self.down.add(name)
                    due[name] = now
                if now < due[name] or self._stopping.is_set():
                    continue
                try:
                    service.start()
                except Exception as exc:
                    log.error("embedded %s did not start: %s; retrying", name, exc)
                    due[name] = now + waits[name]
                    waits[name] = min(waits[name] * 2, RETRY_MAX_SECONDS)
                    continue
                self.down.discard(name)
                waits[name] = RETRY_SECONDS
                self.restarts[name] += 1
                log.warning("embedded %s is back (restart %d)", name, self.restarts[name])
                with contextlib.suppress(Exception):
                    self._on_restart(name)
