"""A server of the bench's own: a child process on a free port and a
temporary data directory, fully embedded (its own PostgreSQL, Redis and, for
the actor core, Ray), rate limits and the connections allowed per address
raised so that the load is not throttled,
stopped by pid with SIGTERM (then SIGKILL) and removed after.

The actor core is ``loadout serve`` itself; the lock baseline is the bench's
``python -m bench.lock_server``, the same server with the baseline under the
gateway."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

__all__ = ["SERVE", "BenchServer"]

#: What runs each core: the ``python -m`` module and its arguments.
SERVE: dict[str, tuple[str, ...]] = {
    "actors": ("server.cli", "serve"),
    "lock": ("bench.lock_server",),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class BenchServer:
    def __init__(
        self, core: str, extra_env: Mapping[str, str] | None = None, *, keep: bool = False
    ) -> None:
        if core not in SERVE:
            raise ValueError(f"no core {core!r}: one of {', '.join(SERVE)}")
        self.core = core
        self.keep = keep
        self.extra_env = dict(extra_env or {})
        self.secret = secrets.token_urlsafe(48)
        self.port = 0
        self.http_port = 0  # /metrics
        self.data_dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def log_path(self) -> Path:
        assert self.data_dir is not None
        return self.data_dir / "server.log"

    def start(self, timeout: float = 180.0) -> BenchServer:
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"loadout-bench-{self.core}-"))
        self.port = _free_port()
        self.http_port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LOADOUT_", "RAY_ADDRESS"))}
        env.update(
            LOADOUT_DATA_DIR=str(self.data_dir),
            LOADOUT_HOST="127.0.0.1",
            LOADOUT_PORT=str(self.port),
            LOADOUT_HTTP_PORT=str(self.http_port),
            LOADOUT_SECRET=self.secret,
            LOADOUT_RATE_PER_SECOND="1000000000",
            LOADOUT_RATE_BURST="1000000000",
            # Every load-generator connection comes from this machine's address.
            LOADOUT_MAX_CONNECTIONS_PER_IP="1000000",
            LOADOUT_LOG_LEVEL="WARNING",
            RAY_USAGE_STATS_ENABLED="0",
        )
        env.update(self.extra_env)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", *SERVE[self.core]],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.tail()
                self.cleanup()
                raise RuntimeError(f"the {self.core} server exited:\n{tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1):
                    return self
            except OSError:
                time.sleep(0.2)
        tail = self.tail()
        self.stop()
        raise RuntimeError(f"the {self.core} server did not come up in {timeout:.0f}s:\n{tail}")

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, AssertionError):
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (the graceful drain), SIGKILL after ``timeout``; then remove the data."""
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.cleanup()

    def cleanup(self) -> None:
        if self.data_dir is not None and not self.keep:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> BenchServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
