"""Test-session fixtures.

Ray is started once per test session (``num_cpus=2``, no dashboard) by this
process, which owns it and shuts it down at the end; servers under test join
it through ``RAY_ADDRESS``, each in a namespace of its own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from persistence.embedded import EmbeddedRedis

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The tests' Ray, and the servers that join it, listen on loopback only (as
# the embedded default does: server/local_ray.py, start_ray); read at import of Ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        namespace="loadout-tests",
        logging_level=logging.WARNING,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """An embedded Redis of the test's own, stopped by pid."""
    server = EmbeddedRedis(tmp_path / "redis-data")
    try:
        yield server.start()
    finally:
        server.stop(timeout=5.0)
