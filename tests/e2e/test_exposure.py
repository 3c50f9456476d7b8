"""Secrets stay out of Ray: a server whose database URL carries a password
leaves it in none of Ray's files nor in its own log (that it is not in the
shard actors' arguments is tested in tests/actors/test_shard_actor.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import ray

from persistence.embedded import EmbeddedPostgres
from protocol.messages import Role
from tests.e2e.support import Client, ServerProcess, new_user

MARKER = "pw-never-in-ray-0f3a"


def _files_with(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


async def test_the_database_password_reaches_no_ray_file_nor_log(
    ray_address: str, tmp_path: Path
) -> None:
    database = EmbeddedPostgres(tmp_path / "pg")
    dsn = database.start()  # trusts local connections: any password is accepted
    with_password = dsn.replace("postgresql://loadout@", f"postgresql://loadout:{MARKER}@")
    assert MARKER in with_password
    server = ServerProcess(
        tmp_path / "data", ray_address, env={"LOADOUT_DATABASE_URL": with_password}
    )
    try:
        server.start()
        async with await Client.open(server, "ops", role=Role.ADMIN) as admin:
            user = new_user()
            reply = await admin.request({"type": "grant", "user": user, "amount": 3, "key": "k"})
            assert reply["type"] == "granted"
        session = Path(ray._private.worker._global_node.get_session_dir_path())
        assert await asyncio.to_thread(_files_with, session, MARKER.encode()) == []
        assert MARKER not in server.log_path.read_text(errors="replace")
    finally:
        server.kill()
        server.kill_actors()
        database.stop()
