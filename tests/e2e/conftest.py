from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.support import ServerProcess


@pytest.fixture(scope="session")
def server(ray_address: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server shared by the end-to-end tests; each test uses its own users."""
    data_dir: Path = tmp_path_factory.mktemp("shared-server")
    proc = ServerProcess(data_dir, ray_address).start()
    try:
        yield proc
    finally:
        try:
            proc.stop()
        finally:
            proc.kill()
            proc.kill_actors()
    # Whatever the tests did, the server logged no crash of its own.
    log = proc.log_path.read_text(errors="replace")
    assert "Traceback" not in log, proc.tail(200)


@pytest.fixture
def fresh_server(ray_address: str, tmp_path: Path) -> Iterator[ServerProcess]:
    """A server of the test's own (for restarts, kills and settings)."""
    proc = ServerProcess(tmp_path / "data", ray_address)
    try:
        yield proc
    finally:
        proc.kill()
        proc.kill_actors()
