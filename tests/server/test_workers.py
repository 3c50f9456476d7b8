"""A gateway worker's settings (``loadout serve --worker``): the supervisor's
services from its services file, the shared ports; no worker without them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server import cli
from server.config import ConfigError, Settings
from server.workers import worker_settings


def _services(data_dir: Path, **urls: str) -> None:
    (data_dir / "run").mkdir(parents=True)
    (data_dir / "run" / "services.json").write_text(json.dumps(urls))


def test_a_worker_uses_the_supervisors_services_and_shares_the_ports(tmp_path: Path) -> None:
    _services(tmp_path, database_url="postgresql://db", redis_url="unix:///r.sock")
    settings = worker_settings(Settings(data_dir=tmp_path, ray_address="127.0.0.1:1234"))
    assert settings.database_url == "postgresql://db"
    assert settings.redis_url == "unix:///r.sock"
    assert settings.reuse_port
    assert not settings.embedded  # so it takes no lock and starts nothing


def test_configured_services_win_over_the_services_file(tmp_path: Path) -> None:
    _services(tmp_path, database_url="postgresql://db", redis_url="unix:///r.sock")
    settings = worker_settings(
        Settings(data_dir=tmp_path, ray_address="a:1", database_url="postgresql://mine")
    )
    assert settings.database_url == "postgresql://mine"


@pytest.mark.parametrize("ray_address", [None, "127.0.0.1:1234"])
def test_a_worker_without_its_supervisors_services_refuses(
    tmp_path: Path, ray_address: str | None
) -> None:
    if ray_address is None:
        _services(tmp_path, database_url="postgresql://db", redis_url="unix:///r.sock")
    with pytest.raises(ConfigError, match=r"services\.json or RAY_ADDRESS"):
        worker_settings(Settings(data_dir=tmp_path, ray_address=ray_address))


@pytest.mark.parametrize("count", ["0", "-1", "two", "257"])
def test_workers_must_be_a_small_positive_count(
    count: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["serve", "--workers", count])
    assert "--workers: must be a whole number from 1 to 256" in capsys.readouterr().err
