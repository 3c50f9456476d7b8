"""server/config.py: settings from an environment mapping (PROTOCOL.md §9) and
the generated secret."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from server.config import ConfigError, Settings


def test_defaults_match_the_protocol() -> None:
    settings = Settings.from_env({})
    assert settings.host == "127.0.0.1"
    assert settings.port == 8765
    assert settings.data_dir == Path("./.loadout")
    assert settings.database_url is None
    assert settings.redis_url is None
    assert settings.ray_address is None
    assert settings.secret == ""
    assert settings.starting_balance == 0
    assert settings.embedded
    # Default limits admit at least 100 requests/s with bursts of 200 (§5).
    assert settings.rate_per_second >= 100
    assert settings.rate_burst >= 200


def test_from_env_reads_only_the_mapping_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOADOUT_PORT", "1234")
    monkeypatch.setenv("LOADOUT_SECRET", "from-the-process-environment-" + "x" * 20)
    settings = Settings.from_env({})
    assert settings.port == 8765
    assert settings.secret == ""


def test_empty_values_mean_default() -> None:
    settings = Settings.from_env(
        {"LOADOUT_HOST": "", "LOADOUT_PORT": "", "LOADOUT_STARTING_BALANCE": ""}
    )
    assert (settings.host, settings.port, settings.starting_balance) == ("127.0.0.1", 8765, 0)


def test_values_are_read(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "LOADOUT_HOST": "0.0.0.0",
            "LOADOUT_PORT": "9000",
            "LOADOUT_DATA_DIR": str(tmp_path),
            "LOADOUT_DATABASE_URL": "postgresql://db/loadout",
            "LOADOUT_REDIS_URL": "redis://cache:6379/0",
            "RAY_ADDRESS": "10.0.0.1:6379",
            "LOADOUT_STARTING_BALANCE": "250",
            "LOADOUT_RATE_BURST": "50",
            "LOADOUT_RATE_PER_SECOND": "12.5",
            "LOADOUT_LOG_LEVEL": "debug",
        }
    )
    assert settings.host == "0.0.0.0"
    assert settings.port == 9000
    assert settings.data_dir == tmp_path
    assert settings.database_url == "postgresql://db/loadout"
    assert settings.redis_url == "redis://cache:6379/0"
    assert settings.ray_address == "10.0.0.1:6379"
    assert settings.starting_balance == 250
    assert settings.rate_burst == 50
    assert settings.rate_per_second == 12.5
    assert settings.log_level == "DEBUG"
    assert not settings.embedded


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LOADOUT_PORT", "http"),
        ("LOADOUT_PORT", "80.5"),
        ("LOADOUT_PORT", "65536"),
        ("LOADOUT_PORT", "-1"),
        ("LOADOUT_STARTING_BALANCE", "lots"),
        ("LOADOUT_STARTING_BALANCE", "-5"),
        ("LOADOUT_STARTING_BALANCE", str(2**53)),
        ("LOADOUT_SHARDS", "0"),
        ("LOADOUT_RATE_BURST", "0"),
        ("LOADOUT_RATE_PER_SECOND", "fast"),
        ("LOADOUT_RATE_PER_SECOND", "0"),
        ("LOADOUT_RATE_PER_SECOND", "nan"),
        ("LOADOUT_IDLE_SECONDS", "inf"),
        ("LOADOUT_FLUSH_INTERVAL_MS", "-1"),
        ("LOADOUT_LOG_LEVEL", "loud"),
        ("LOADOUT_MAX_CONNECTIONS_PER_IP", "0"),
        ("LOADOUT_MAX_CONNECTIONS_PER_IP", "many"),
        ("LOADOUT_HANDSHAKE_TIMEOUT", "0"),
        ("LOADOUT_CONNECTION_IDLE_TIMEOUT", "20"),  # not past the 20 s ping interval
        ("LOADOUT_MAX_BAD_FRAMES", "-1"),
        ("LOADOUT_MAX_WATCH", "0"),
    ],
)
def test_bad_values_raise_config_error_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: value})
    assert name in str(info.value)


def test_connection_limits_default_and_are_read() -> None:
    """PROTOCOL.md §5 closes a connection after more than 10 bad frames a minute."""
    default = Settings.from_env({})
    assert default.max_bad_frames == 10
    assert default.max_connections_per_ip == 1_000
    assert default.connection_idle_timeout == 60.0
    assert default.handshake_timeout == 10.0
    settings = Settings.from_env(
        {
            "LOADOUT_MAX_CONNECTIONS_PER_IP": "5",
            "LOADOUT_HANDSHAKE_TIMEOUT": "2.5",
            "LOADOUT_CONNECTION_IDLE_TIMEOUT": "90",
            "LOADOUT_MAX_BAD_FRAMES": "1000",
        }
    )
    assert settings.max_connections_per_ip == 5
    assert settings.handshake_timeout == 2.5
    assert settings.connection_idle_timeout == 90.0
    assert settings.max_bad_frames == 1000


def test_watch_limit_defaults_to_the_protocols_and_is_read() -> None:
    """PROTOCOL.md §11: a connection watches at most LOADOUT_MAX_WATCH users."""
    assert Settings.from_env({}).max_watch == 10_000
    assert Settings.from_env({"LOADOUT_MAX_WATCH": "3"}).max_watch == 3


def test_with_secret_generates_once_with_mode_0600(tmp_path: Path) -> None:
    data_dir = tmp_path / "not" / "yet" / "there"
    env = {"LOADOUT_DATA_DIR": str(data_dir)}
    first = Settings.from_env(env).with_secret()
    assert len(first.secret) >= 32
    stored = data_dir / "secret"
    assert stored.read_text().strip() == first.secret
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    modified = stored.stat().st_mtime_ns

    second = Settings.from_env(env).with_secret()
    assert second.secret == first.secret
    assert stored.stat().st_mtime_ns == modified
    assert [p.name for p in data_dir.iterdir()] == ["secret"]


def test_with_secret_keeps_everything_else(tmp_path: Path) -> None:
    settings = Settings.from_env({"LOADOUT_DATA_DIR": str(tmp_path), "LOADOUT_PORT": "9001"})
    filled = settings.with_secret()
    assert filled.port == 9001
    assert filled.data_dir == tmp_path
    assert settings.secret == ""  # frozen settings are not changed in place


def test_different_data_dirs_get_different_secrets(tmp_path: Path) -> None:
    a = Settings.from_env({"LOADOUT_DATA_DIR": str(tmp_path / "a")}).with_secret()
    b = Settings.from_env({"LOADOUT_DATA_DIR": str(tmp_path / "b")}).with_secret()
    assert a.secret != b.secret


def test_with_secret_uses_loadout_secret_without_writing(tmp_path: Path) -> None:
    secret = "configured-" + "c" * 40
    settings = Settings.from_env({"LOADOUT_DATA_DIR": str(tmp_path), "LOADOUT_SECRET": secret})
    assert settings.with_secret().secret == secret
    assert not (tmp_path / "secret").exists()


def test_too_short_stored_secret_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("short\n")
    with pytest.raises(ConfigError, match="too short"):
        Settings.from_env({"LOADOUT_DATA_DIR": str(tmp_path)}).with_secret()


def test_repr_never_contains_the_secret(tmp_path: Path) -> None:
    generated = Settings.from_env({"LOADOUT_DATA_DIR": str(tmp_path)}).with_secret()
    configured = Settings.from_env({"LOADOUT_SECRET": "hunter2-" + "h" * 40})
    for settings in (generated, configured):
        assert settings.secret
        assert settings.secret not in repr(settings)
        assert settings.secret not in str(settings)
        assert "Settings(" in repr(settings)
