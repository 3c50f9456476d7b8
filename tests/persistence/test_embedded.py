"""Tests for persistence.embedded: real servers under tmp_path, stopped by pid."""

import asyncio
import contextlib
import logging
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis

from persistence.embedded import EmbeddedError, EmbeddedPostgres, EmbeddedRedis

REPO = Path(__file__).resolve().parents[2]


def gone(pid: int, timeout: float) -> bool:
    """Whether *pid* exits within *timeout*; an unreaped zombie counts as exited."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return True
        if stat.rpartition(")")[2].split()[0] == "Z":
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def kill_if_running(pid: int) -> None:
    """Last-resort cleanup for a server that is not our child (its parent was killed)."""
    if not gone(pid, 0.0):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path / "data")
    try:
        yield server
    finally:
        server.stop(timeout=5.0)  # by pid, through its Popen; SIGKILL after the timeout


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "data")
    try:
        yield server
    finally:
        server.stop(timeout=5.0)  # by pid, through its Popen; SIGKILL after the timeout


async def query(dsn: str, *statements: str) -> list[asyncpg.Record]:
    con = await asyncpg.connect(dsn)
    try:
        for statement in statements[:-1]:
            await con.execute(statement)
        rows: list[asyncpg.Record] = await con.fetch(statements[-1])
        return rows
    finally:
        await con.close()


def test_postgres_keeps_data_across_restarts(postgres: EmbeddedPostgres, tmp_path: Path) -> None:
    dsn = postgres.start()
    assert dsn.startswith("postgresql://loadout@/loadout?host=")
    pid = postgres.pid
    assert pid is not None
    if os.geteuid() == 0:  # postgres refuses root; it must run as its own user
        assert os.stat(f"/proc/{pid}").st_uid == pwd.getpwnam("loadout_pg").pw_uid
    rows = asyncio.run(
        query(
            dsn,
            "CREATE TABLE wallet (player text PRIMARY KEY, gems bigint NOT NULL)",
            "INSERT INTO wallet VALUES ('ada', 120)",
            "SELECT current_database() AS db, current_setting('fsync') AS fsync",
        )
    )
    assert (rows[0]["db"], rows[0]["fsync"]) == ("loadout", "on")
    postgres.stop()
    assert postgres.pid is None
    assert gone(pid, 1.0)

    dsn = postgres.start()
    rows = asyncio.run(query(dsn, "SELECT player, gems FROM wallet"))
    assert [tuple(r) for r in rows] == [("ada", 120)]
    assert not (tmp_path / "data" / "postgres.initdb").exists()


def test_postgres_stops_leftover_on_same_dir(
    postgres: EmbeddedPostgres, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dsn = postgres.start()
    leftover = postgres.pid
    assert leftover is not None
    asyncio.run(
        query(
            dsn, "CREATE TABLE grant_log (id int)", "INSERT INTO grant_log VALUES (7)", "SELECT 1"
        )
    )
    successor = EmbeddedPostgres(tmp_path / "data")
    try:
        with caplog.at_level(logging.INFO, logger="loadout.embedded"):
            dsn = successor.start()
        assert gone(leftover, 0.1)
        assert successor.pid not in (None, leftover)
        assert f"leftover postgres (pid {leftover})" in caplog.text
        assert [tuple(r) for r in asyncio.run(query(dsn, "SELECT id FROM grant_log"))] == [(7,)]
    finally:
        successor.stop(timeout=5.0)


def test_redis_ping_and_pubsub(redis_server: EmbeddedRedis) -> None:
    url = redis_server.start()
    assert url.startswith("unix://") and url.endswith("/redis.sock")
    client = redis.Redis.from_url(url)
    pubsub = client.pubsub()  # type: ignore[no-untyped-call]
    try:
        assert client.ping()
        with pytest.raises(RuntimeError, match="already running"):
            redis_server.start()
        pubsub.subscribe("shard:1")
        subscribed = pubsub.get_message(timeout=2.0)
        assert subscribed is not None and subscribed["type"] == "subscribe"
        assert client.publish("shard:1", b"wallet-changed") == 1
        message = pubsub.get_message(timeout=2.0)
        assert message is not None and message["data"] == b"wallet-changed"
    finally:
        pubsub.close()
        client.close()


def test_redis_socket_falls_back_to_short_dir_and_stops_leftover(tmp_path: Path) -> None:
    data = tmp_path / ("d" * 100)
    first, second = EmbeddedRedis(data), EmbeddedRedis(data)
    try:
        url = first.start()
        assert not url.startswith(f"unix://{data}")
        leftover = first.pid
        assert leftover is not None
        second.start()
        assert gone(leftover, 0.1)
        assert second.pid not in (None, leftover)
    finally:
        first.stop(timeout=2.0)
        second.stop(timeout=2.0)
    assert not Path(url.removeprefix("unix://")).parent.exists()  # temp dir removed


def test_redis_ignores_stale_pidfile(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    (tmp_path / "data" / "redis").mkdir(parents=True)
    (tmp_path / "data" / "redis" / "redis.pid").write_text(dead.stdout.decode())
    url = redis_server.start()
    with redis.Redis.from_url(url) as client:
        assert client.ping()


def test_start_failure_names_the_log(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "postgres").mkdir(parents=True)
    (data / "postgres" / "PG_VERSION").write_text("18\n")  # a cluster that is not one
    server = EmbeddedPostgres(data)
    try:
        with pytest.raises(EmbeddedError, match=r"exited with code \d+; see .*/postgres\.log"):
            server.start(timeout=10.0)
        assert server.pid is None
    finally:
        server.stop(timeout=2.0)


CHILD = """
import sys, time
from pathlib import Path
from persistence.embedded import EmbeddedPostgres, EmbeddedRedis
data = Path(sys.argv[1])
pg, rd = EmbeddedPostgres(data), EmbeddedRedis(data)
pg.start()
rd.start()
print(pg.pid, rd.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
def test_servers_die_with_a_parent_killed_by_sigkill(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "data")],
        stdout=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    pids: list[int] = []
    try:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2, "child failed to start the servers"
        if os.geteuid() == 0:  # the death signal must survive the switch to loadout_pg
            assert os.stat(f"/proc/{pids[0]}").st_uid == pwd.getpwnam("loadout_pg").pw_uid
        parent.kill()
        parent.wait()
        assert gone(pids[0], 10.0), "postgres outlived its parent"
        assert gone(pids[1], 10.0), "redis outlived its parent"
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
        for pid in pids:
            kill_if_running(pid)


def test_postgres_starts_over_a_zombie_postmaster(
    postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    """Regression (issue resilience): after a kill -9 of the whole server the
    old postmaster may linger as a zombie, which PostgreSQL takes for a live
    postmaster ("lock file postmaster.pid already exists"); the first start
    after the crash must work."""
    dsn = postgres.start()
    asyncio.run(query(dsn, "CREATE TABLE kept (id int)", "INSERT INTO kept VALUES (1)", "SELECT 1"))
    postgres.stop()
    pidfile = tmp_path / "data" / "postgres" / "postmaster.pid"
    owner = os.stat(pidfile.parent)  # the zombie is PostgreSQL's user's, as the old postmaster was
    zombie = subprocess.Popen(["/bin/sh", "-c", "exit 0"], user=owner.st_uid, group=owner.st_gid)
    while Path(f"/proc/{zombie.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        time.sleep(0.01)  # exited, not reaped: a zombie of ours
    try:
        pidfile.write_text(f"{zombie.pid}\n{tmp_path / 'data' / 'postgres'}\n")
        os.chown(pidfile, owner.st_uid, owner.st_gid)
        dsn = postgres.start()
        assert [tuple(r) for r in asyncio.run(query(dsn, "SELECT id FROM kept"))] == [(1,)]
    finally:
        zombie.wait()
