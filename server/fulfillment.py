"""The fulfillment worker (PROTOCOL.md §12; DESIGN.md "Fulfillment: an
outbox beside the journal").

It claims due ``pending`` orders from the ``orders`` outbox (``FOR UPDATE
SKIP LOCKED`` with a lease, so several workers never take the same order and
a crashed one's orders come back when the lease ends), calls out, and moves
the order on through its user's shard, which keeps the wallet's single
writer: an email order gets its voucher code (kept in the row *before* the
email is sent, so a retry sends the same code) and becomes ``completed``; a
physical order is placed at the shop with the order id as the idempotency
key and becomes ``processing``.  A failed attempt is retried with
exponential backoff; after the last attempt (or a failure no retry can
help) the order becomes ``failed`` and its gems come back in that change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from actors.catalog import Catalog
from persistence import orders as outbox
from persistence.orders import DueOrder
from protocol.errors import ErrorCode, RequestError
from protocol.money import AdvanceOrder, OrderStatus, Tracking
from server.asking import ask
from server.batching import Backend
from server.mail import Mailer, MailError, Voucher, render, voucher_code
from server.shop import ShopClient, ShopError

__all__ = ["FulfillmentWorker", "WorkerSettings"]

log = logging.getLogger("loadout.fulfillment")


@dataclass(frozen=True)
class WorkerSettings:
    attempts: int = 5
    backoff: float = 30.0
    lease: float = 120.0
    poll: float = 1.0
    batch: int = 20
    sender: str = "Loadout <noreply@loadout.invalid>"


class FulfillmentWorker:
    def __init__(
        self,
        pool: asyncpg.Pool,
        backend: Backend,
        mailer: Mailer,
        shop: ShopClient | None,
        catalog: Callable[[], Catalog],
        settings: WorkerSettings,
        count: Callable[[str, str], None] = lambda delivery, outcome: None,
    ) -> None:
        self._count = count
        self._pool = pool
        self._backend = backend
        self._mailer = mailer
        self._shop = shop
        self._catalog = catalog
        self.settings = settings
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="fulfillment")

    def poke(self) -> None:
        """Look for due orders now (an order was just retried or opened)."""
        self._wake.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        deliveries = ["email", "physical"] if self._shop is not None else ["email"]
        while True:
            try:
                due = await outbox.claim_due(
                    self._pool, deliveries, self.settings.batch, self.settings.lease
                )
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("fulfillment: cannot claim orders (%s); retrying", exc)
                due = []
            except Exception:  # a bug: say so, and keep the worker alive
                log.exception("fulfillment: claiming orders failed")
                due = []
            if due:
                await asyncio.gather(*(self._attempt(order) for order in due))
                continue  # there may be more
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll)

    async def _attempt(self, due: DueOrder) -> None:
        try:
            if due.status == OrderStatus.CANCELLED.value:
                await self._cancel_at_shop(due)
            elif due.delivery == "email":
                await self._email(due)
            else:
                await self._place(due)
        except (MailError, ShopError) as exc:
            await self._failed(due, str(exc), exc.retryable)
        except RequestError as exc:
            if exc.code is ErrorCode.NOT_CANCELLABLE:  # it ended meanwhile (cancelled)
                # A shop order placed meanwhile is cancelled there by a later claim.
                log.info("order %s ended before fulfillment: %s", due.order, exc.message)
                return
            await self._failed(due, f"{exc.code}: {exc.message}", True)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            await self._failed(due, repr(exc), True)
        except Exception:
            log.exception("bug while fulfilling order %s", due.order)
            await self._failed(due, "internal error", True)

    async def _email(self, due: DueOrder) -> None:
        if due.email is None:  # opened with no email: cannot happen (address_required)
            raise MailError("the order has no email address", retryable=False)
        code = due.voucher or await self._keep_voucher(due.order)
        # Processing first: from here the player can no longer cancel (and get
        # the gems back) while the code is on its way.
        await self._advance(due, OrderStatus.PROCESSING)
        item = self._catalog().lookup(due.sku)
        voucher = Voucher(
            due.order, due.user_id, due.email, due.sku, item.name if item else due.sku,
            due.quantity, code,
        )  # fmt: skip
        await self._mailer.send(render(voucher, self.settings.sender))
        log.info("order %s: voucher emailed to user %s", due.order, due.user_id)
        await self._advance(due, OrderStatus.COMPLETED, voucher=code)
        self._count(due.delivery, "done")

    async def _keep_voucher(self, order: str) -> str:
        for _ in range(3):
            try:
                return await outbox.keep_voucher(self._pool, order, voucher_code())
            except asyncpg.UniqueViolationError:  # another order's code: draw again
                continue
        raise MailError("no unique voucher code could be drawn", retryable=True)

    async def _place(self, due: DueOrder) -> None:
        assert self._shop is not None
        item = self._catalog().lookup(due.sku)
        shop_order = due.shop_order or await self._shop.place_order(
            due.order, due.sku, due.quantity, due.email, due.address or {},
            title=item.name if item else None,
        )  # fmt: skip
        await outbox.keep_shop_order(self._pool, due.order, shop_order)
        log.info("order %s placed at the shop as %s", due.order, shop_order)
        await self._advance(due, OrderStatus.PROCESSING, shop_order=shop_order)
        self._count(due.delivery, "done")

    async def _advance(
        self,
        due: DueOrder,
        status: OrderStatus,
        *,
        voucher: str | None = None,
        shop_order: str | None = None,
        tracking: Tracking | None = None,
    ) -> None:
        request = AdvanceOrder(
            # One key per step of this round: a retried order's steps are new.
            key=f"{due.order}:{status.value}:{due.updated_at}", order=due.order, status=status,
            voucher=voucher, shop_order=shop_order, tracking=tracking,
        )  # fmt: skip
        await ask(self._backend, due.user_id, request)

    async def _failed(self, due: DueOrder, error: str, retryable: bool) -> None:
        last = due.attempts >= self.settings.attempts or not retryable
        if not last:
            wait = self.settings.backoff * 2 ** (due.attempts - 1)
            log.warning(
                "order %s attempt %d failed (%s); next in %.0f s", due.order, due.attempts,
                error, wait,
            )  # fmt: skip
            await outbox.note_failure(self._pool, due.order, error, wait)
            self._count(due.delivery, "retry")
            return
        log.error("order %s failed after %d attempts: %s", due.order, due.attempts, error)
        await outbox.note_failure(self._pool, due.order, error, self.settings.lease)
        try:
            await self._advance(due, OrderStatus.FAILED)
            self._count(due.delivery, "failed")
        except RequestError as exc:
            if exc.code is not ErrorCode.NOT_CANCELLABLE:
                log.warning("order %s: could not record the failure (%s)", due.order, exc)

    async def _cancel_at_shop(self, due: DueOrder) -> None:
        """The order was cancelled here (by the player, an operator's refund)
        after the shop took it: cancel it there too."""
        assert self._shop is not None and due.shop_order is not None
        try:
            await self._shop.cancel_order(due.shop_order)
        except ShopError as exc:
            if exc.retryable and due.attempts < self.settings.attempts:
                wait = self.settings.backoff * 2 ** (due.attempts - 1)
                await outbox.note_failure(self._pool, due.order, f"cancel: {exc}", wait)
                return
            log.error(
                "order %s: the shop did not cancel %s (%s): cancel it there by hand",
                due.order, due.shop_order, exc,
            )  # fmt: skip
            await outbox.note_failure(self._pool, due.order, f"cancel: {exc}", 0)
        else:
            log.info("order %s: cancelled at the shop (%s)", due.order, due.shop_order)
        await outbox.shop_cancelled(self._pool, due.order)
