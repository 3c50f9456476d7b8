"""Settings, read once from the environment at start-up (PROTOCOL.md §9).

Nothing below ``main`` reads ``os.environ``; everything takes a ``Settings``.
The secret is never logged: ``Settings.__repr__`` hides it.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TypeVar

__all__ = ["ENVIRONMENT", "ConfigError", "NoSecret", "Setting", "Settings", "environment_help"]


class ConfigError(ValueError):
    """A setting has a value Loadout cannot use; the message names it."""


class NoSecret(ConfigError):
    """No secret is set and none was ever generated (only ``serve`` makes one)."""


@dataclass(frozen=True)
class Setting:
    """One environment variable: its name, its default and what it sets."""

    name: str
    default: str
    meaning: str


#: Every environment variable Loadout reads, in one place: ``Settings.from_env``
#: reads them and each command's ``--help`` lists those it uses from here.
ENVIRONMENT = {
    s.name: s
    for s in (
        Setting("LOADOUT_HOST", "127.0.0.1", "address the gateway listens on"),
        Setting("LOADOUT_PORT", "8765", "WebSocket port (also /healthz, /readyz)"),
        Setting(
            "LOADOUT_HTTP_PORT",
            "8780",
            "operators' HTTP port: /metrics, /healthz, /readyz, /v1/webhooks/*",
        ),
        Setting("LOADOUT_DATA_DIR", ".loadout", "embedded services' data and the secret"),
        Setting("LOADOUT_DATABASE_URL", "embedded", "an existing PostgreSQL"),
        Setting("LOADOUT_REDIS_URL", "embedded", "an existing Redis (pushes, catalog notices)"),
        Setting("RAY_ADDRESS", "local Ray", "a Ray cluster to run the shard actors on"),
        Setting("LOADOUT_SECRET", "<data dir>/secret", "HS256 token secret"),
        Setting("LOADOUT_STARTING_BALANCE", "0", "gems a new user starts with"),
        Setting("LOADOUT_SHARDS", "2", "shard actors of a new cluster (then: cluster scale)"),
        Setting("LOADOUT_PARTITIONS", "256", "partitions of a new cluster; fixed after"),
        Setting("LOADOUT_RAY_NAMESPACE", "loadout", "Ray namespace of the shard actors"),
        Setting("LOADOUT_RATE_PER_SECOND", "100", "requests per second per user"),
        Setting("LOADOUT_RATE_BURST", "200", "burst of requests per user"),
        Setting("LOADOUT_FLUSH_INTERVAL_MS", "0", "extra wait before a journal flush"),
        Setting("LOADOUT_IDLE_SECONDS", "600", "idle users are passivated after this long"),
        Setting("LOADOUT_MAX_CONNECTIONS", "20000", "open WebSockets per gateway"),
        Setting("LOADOUT_MAX_CONNECTIONS_PER_IP", "1000", "open WebSockets per client address"),
        Setting("LOADOUT_HANDSHAKE_TIMEOUT", "10", "seconds to complete the HTTP upgrade"),
        Setting("LOADOUT_CONNECTION_IDLE_TIMEOUT", "60", "seconds without a frame, then close"),
        Setting("LOADOUT_MAX_BAD_FRAMES", "10", "bad frames a minute, then close 1008"),
        Setting("LOADOUT_MAX_WATCH", "10000", "users one service connection may watch"),
        Setting("LOADOUT_LOG_LEVEL", "INFO", "logging level"),
        Setting("LOADOUT_FULFILLMENT_ATTEMPTS", "5", "tries of an order before it fails"),
        Setting("LOADOUT_FULFILLMENT_BACKOFF", "30", "seconds before the 2nd try (doubling)"),
        Setting("LOADOUT_FULFILLMENT_LEASE", "120", "seconds a claimed order is held"),
        Setting("LOADOUT_FULFILLMENT_WORKER", "1", "0: this process runs no worker"),
        Setting("LOADOUT_SMTP_URL", "unset: <data dir>/outbox/", "smtp://user:pass@host:port"),
        Setting("LOADOUT_SMTP_CA_FILE", "system CAs", "CA file to trust for the SMTP server"),
        Setting("LOADOUT_MAIL_FROM", "Loadout <noreply@loadout.invalid>", "voucher emails' sender"),
        Setting("LOADOUT_SHOPIFY_URL", "unset: ship by hand", "the shop's Admin REST base URL"),
        Setting("LOADOUT_SHOPIFY_TOKEN", "unset", "the shop's access token"),
        Setting("LOADOUT_SHOPIFY_WEBHOOK_SECRET", "unset", "verifies the shop's webhooks"),
        Setting(
            "LOADOUT_PAYMENTS_WEBHOOK_SECRET",
            "<data dir>/payments_webhook_secret",
            "verifies top-up webhooks",
        ),
    )
}


def environment_help(*names: str) -> str:
    """The ``--help`` epilog of a command that reads the variables ``names``."""
    width = max(len(name) for name in names)
    lines = [
        f"  {name:<{width}}  {ENVIRONMENT[name].meaning} (default: {ENVIRONMENT[name].default})"
        for name in names
    ]
    return "environment variables:\n" + "\n".join(lines)


_N = TypeVar("_N", int, float)


def env_number(env: Mapping[str, str], name: str, default: _N, low: _N, high: _N) -> _N:
    """A numeric setting of the type of its default, within [low, high]."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    kind = type(default)
    try:
        value = kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"{name} must be {what}, not {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, not {value}")
    return value


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8765
    #: Operators' HTTP port: /metrics, /healthz, /readyz (PROTOCOL.md §12-13).
    http_port: int = 8780
    data_dir: Path = Path(".loadout")
    database_url: str | None = None
    redis_url: str | None = None
    ray_address: str | None = None
    secret: str = field(default="", repr=False)
    starting_balance: int = 0
    shards: int = 2
    #: Partitions of a new cluster (None: the cluster's, or 256 for a new one).
    partitions: int | None = None
    ray_namespace: str = "loadout"
    rate_per_second: float = 100.0
    rate_burst: int = 200
    flush_interval_ms: float = 0.0
    idle_seconds: float = 600.0
    max_connections: int = 20_000
    #: Open WebSockets per client address (an IPv6 /64): one host, or one NAT,
    #: takes at most 5% of the default connection limit.
    max_connections_per_ip: int = 1_000
    handshake_timeout: float = 10.0
    #: Seconds without any frame from a connection, not even a pong, before it
    #: is closed (server.gateway.GatewayLimits); longer than the 20 s ping interval.
    connection_idle_timeout: float = 60.0
    #: Bad frames a connection may send in a minute; one more closes it 1008.
    max_bad_frames: int = 10
    #: Users one connection may watch at once (PROTOCOL.md §11).
    max_watch: int = 10_000
    log_level: str = "INFO"
    #: Listen with SO_REUSEPORT, beside other gateway processes on the same
    #: ports (``loadout serve --workers N``); not read from the environment.
    reuse_port: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        data_dir = Path(env.get("LOADOUT_DATA_DIR") or ".loadout")
        level = (env.get("LOADOUT_LOG_LEVEL") or "INFO").upper()
        if not isinstance(logging.getLevelName(level), int):
            raise ConfigError(f"LOADOUT_LOG_LEVEL must be a logging level, not {level!r}")
        return cls(
            host=env.get("LOADOUT_HOST") or "127.0.0.1",
            port=env_number(env, "LOADOUT_PORT", 8765, 0, 65535),
            http_port=env_number(env, "LOADOUT_HTTP_PORT", 8780, 0, 65535),
            data_dir=data_dir,
            database_url=env.get("LOADOUT_DATABASE_URL") or None,
            redis_url=env.get("LOADOUT_REDIS_URL") or None,
            ray_address=env.get("RAY_ADDRESS") or None,
            secret=env.get("LOADOUT_SECRET") or "",
            starting_balance=env_number(env, "LOADOUT_STARTING_BALANCE", 0, 0, 2**53 - 1),
            shards=env_number(env, "LOADOUT_SHARDS", 2, 1, 1024),
            partitions=(
                env_number(env, "LOADOUT_PARTITIONS", 256, 1, 65_536)
                if env.get("LOADOUT_PARTITIONS")
                else None
            ),
            ray_namespace=env.get("LOADOUT_RAY_NAMESPACE") or "loadout",
            rate_per_second=env_number(env, "LOADOUT_RATE_PER_SECOND", 100.0, 0.1, 1e9),
            rate_burst=env_number(env, "LOADOUT_RATE_BURST", 200, 1, 10**9),
            flush_interval_ms=env_number(env, "LOADOUT_FLUSH_INTERVAL_MS", 0.0, 0.0, 1000.0),
            idle_seconds=env_number(env, "LOADOUT_IDLE_SECONDS", 600.0, 1.0, 10**7),
            max_connections=env_number(env, "LOADOUT_MAX_CONNECTIONS", 20_000, 1, 10**7),
            max_connections_per_ip=env_number(
                env, "LOADOUT_MAX_CONNECTIONS_PER_IP", 1_000, 1, 10**7
            ),
            handshake_timeout=env_number(env, "LOADOUT_HANDSHAKE_TIMEOUT", 10.0, 0.1, 3600.0),
            connection_idle_timeout=env_number(
                env, "LOADOUT_CONNECTION_IDLE_TIMEOUT", 60.0, 21.0, 10**7
            ),
            max_bad_frames=env_number(env, "LOADOUT_MAX_BAD_FRAMES", 10, 0, 10**9),
            max_watch=env_number(env, "LOADOUT_MAX_WATCH", 10_000, 1, 10**7),
            log_level=level,
        )

    def with_secret(self, *, create: bool = True) -> Settings:
        """These settings with the secret filled in: from ``LOADOUT_SECRET``, or
        generated once and kept in the data directory with mode 0600.

        Without ``create`` (every command but ``serve``) a secret that was
        never generated is ``NoSecret``: a token signed with a new one would
        be refused by the server."""
        if self.secret:
            return self
        path = self.data_dir / "secret"
        if not create and not path.exists():
            where = "no data directory" if not self.data_dir.is_dir() else "no secret in"
            raise NoSecret(
                f"LOADOUT_SECRET is unset and there is {where} {self.data_dir}: run this where"
                " `loadout serve` ran, or set LOADOUT_DATA_DIR or LOADOUT_SECRET"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(48))
        secret = path.read_text().strip()
        if len(secret) < 32:
            raise ConfigError(f"the secret in {path} is too short; delete it to generate one")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["secret"] = secret
        return Settings(**values)

    @property
    def embedded(self) -> bool:
        return self.database_url is None or self.redis_url is None or self.ray_address is None
