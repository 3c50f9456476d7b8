"""Fulfillment and money in ``loadout serve`` (PROTOCOL.md §12): its
settings, the fulfillment worker and the webhook routes, put together for
the app (``server.app``)."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from starlette.routing import Route

from actors.catalog import Catalog
from server.batching import Backend
from server.config import ConfigError, env_number
from server.fulfillment import FulfillmentWorker, WorkerSettings
from server.mail import mailer_from
from server.metrics import Metrics
from server.shop import ShopClient
from server.webhooks import WebhookSecrets, webhook_routes

__all__ = ["Commerce", "CommerceSettings"]

log = logging.getLogger("loadout.commerce")


@dataclass(frozen=True)
class CommerceSettings:
    data_dir: Path
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    run_worker: bool = True
    smtp_url: str | None = field(default=None, repr=False)
    smtp_ca_file: str | None = None
    shopify_url: str | None = None
    shopify_token: str | None = field(default=None, repr=False)
    shopify_webhook_secret: str | None = field(default=None, repr=False)
    payments_webhook_secret: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, data_dir: Path, env: Mapping[str, str] | None = None) -> CommerceSettings:
        env = os.environ if env is None else env
        worker = WorkerSettings(
            attempts=env_number(env, "LOADOUT_FULFILLMENT_ATTEMPTS", 5, 1, 100),
            backoff=env_number(env, "LOADOUT_FULFILLMENT_BACKOFF", 30.0, 0.01, 86_400),
            lease=env_number(env, "LOADOUT_FULFILLMENT_LEASE", 120.0, 0.1, 86_400),
            sender=env.get("LOADOUT_MAIL_FROM") or WorkerSettings.sender,
        )
        shop_url = env.get("LOADOUT_SHOPIFY_URL") or None
        token = env.get("LOADOUT_SHOPIFY_TOKEN") or None
        if shop_url and not token:
            raise ConfigError("LOADOUT_SHOPIFY_URL is set: set LOADOUT_SHOPIFY_TOKEN too")
        return cls(
            data_dir=data_dir,
            worker=worker,
            run_worker=(env.get("LOADOUT_FULFILLMENT_WORKER") or "1") != "0",
            smtp_url=env.get("LOADOUT_SMTP_URL") or None,
            smtp_ca_file=env.get("LOADOUT_SMTP_CA_FILE") or None,
            shopify_url=shop_url,
            shopify_token=token,
            shopify_webhook_secret=env.get("LOADOUT_SHOPIFY_WEBHOOK_SECRET") or None,
            payments_webhook_secret=env.get("LOADOUT_PAYMENTS_WEBHOOK_SECRET")
            or _generated_secret(data_dir / "payments_webhook_secret"),
        )


def _generated_secret(path: Path) -> str:
    """The laptop default: a payments webhook secret generated once into the
    data directory (mode 0600), so a signed top-up works on a fresh install."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another gateway process made it meanwhile
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
    return path.read_text().strip()


class Commerce:
    """The worker and the webhook routes of one gateway process."""

    def __init__(
        self,
        settings: CommerceSettings,
        pool: asyncpg.Pool,
        backend: Backend,
        catalog: Callable[[], Catalog],
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        mailer = mailer_from(settings.smtp_url, settings.data_dir, ca_file=settings.smtp_ca_file)
        self.shop = (
            ShopClient(settings.shopify_url, settings.shopify_token or "")
            if settings.shopify_url
            else None
        )
        self.worker = FulfillmentWorker(
            pool, backend, mailer, self.shop, catalog, settings.worker,
            lambda delivery, outcome: metrics.fulfillment.labels(delivery, outcome).inc(),
        )  # fmt: skip
        secrets_ = WebhookSecrets(settings.shopify_webhook_secret, settings.payments_webhook_secret)
        self.routes: list[Route] = webhook_routes(
            pool, backend, secrets_, self.worker.poke,
            lambda source, outcome: metrics.webhooks.labels(source, outcome).inc(),
        )  # fmt: skip

    def start(self) -> None:
        if self.settings.run_worker:
            self.worker.start()
            log.info(
                "fulfillment worker: email %s, shop %s",
                "over SMTP" if self.settings.smtp_url else "to <data dir>/outbox/",
                self.settings.shopify_url or "not configured (ship by hand)",
            )

    async def close(self) -> None:
        await self.worker.close()
        if self.shop is not None:
            await self.shop.aclose()
