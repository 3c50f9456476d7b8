"""Inbound webhooks on the HTTP port (PROTOCOL.md §12): the shop's order and
fulfillment events and the payment provider's top-ups and refunds.

Each request's raw body is read with a size limit and its signature checked
*before* anything is parsed: a bad, missing or stale signature gets 401 and
changes nothing.  A verified event becomes a keyed request to the user's
shard (the key derived from the event's own identity: the shop's webhook id,
the provider's transaction), so a delivery repeated, or sent fifty times at
once, changes the user once.  Every delivery is logged in
``webhook_events``.  A provider retries what is not answered 2xx: an outcome
that is not known (a shard unavailable) gets 503 so that it does.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from persistence import orders as outbox
from protocol.errors import ErrorCode, RequestError
from protocol.money import AdvanceOrder, OrderStatus, Payment, PaymentApplied, Tracking
from server.asking import ask
from server.batching import Backend
from server.signatures import payment_valid, shopify_valid
from server.webhook_events import BadEvent, ShopEvent, parse_payment, parse_shop_event

__all__ = ["MAX_BODY", "WebhookSecrets", "webhook_routes"]

log = logging.getLogger("loadout.webhooks")

#: Largest webhook body read (bytes); a larger one gets 413 unread.
MAX_BODY = 256 * 1024


@dataclass(frozen=True)
class WebhookSecrets:
    shopify: str | None
    payments: str | None


class _TooLarge(Exception):
    pass


async def _body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _key(*parts: str) -> str:
    """An idempotency key (at most 64 characters) for an outside event."""
    return "ext:" + hashlib.blake2b("\0".join(parts).encode(), digest_size=24).hexdigest()


def _answer(status: int, **body: object) -> Response:
    outcome = body.get("outcome")
    headers = {"x-loadout-outcome": str(outcome)} if outcome is not None else None
    return JSONResponse(body, status, headers=headers)


def webhook_routes(
    pool: asyncpg.Pool,
    backend: Backend,
    secrets: WebhookSecrets,
    poke: Callable[[], None],
    count: Callable[[str, str], None] = lambda source, outcome: None,
) -> list[Route]:
    """The two webhook routes; ``count(source, outcome)`` counts every delivery."""

    async def counted(source: str, answer: Awaitable[Response]) -> Response:
        response = await answer
        outcome = response.headers.get("x-loadout-outcome") or str(response.status_code)
        count(source, outcome)
        return response

    async def received(request: Request, check: Callable[[bytes], bool]) -> bytes | Response:
        try:
            raw = await _body(request)
        except _TooLarge:
            return _answer(413, error=f"bodies are limited to {MAX_BODY} bytes")
        except ClientDisconnect:
            return _answer(400, error="the body did not arrive")
        if not check(raw):
            log.warning("webhook %s: bad or missing signature (refused)", request.url.path)
            return _answer(401, error="bad or missing signature")
        return raw

    async def shopify(request: Request) -> Response:
        secret = secrets.shopify
        if not secret:
            return _answer(503, error="LOADOUT_SHOPIFY_WEBHOOK_SECRET is not set")
        signature = request.headers.get("x-shopify-hmac-sha256")
        raw = await received(request, lambda body: shopify_valid(body, signature, secret))
        if isinstance(raw, Response):
            return raw
        try:
            event = parse_shop_event(
                request.headers.get("x-shopify-topic"),
                request.headers.get("x-shopify-webhook-id"),
                raw,
            )
        except BadEvent as exc:
            return _answer(400, error=str(exc))
        return await _shop_event(pool, backend, event)

    async def payments(request: Request) -> Response:
        secret = secrets.payments
        if not secret:
            return _answer(503, error="LOADOUT_PAYMENTS_WEBHOOK_SECRET is not set")
        signature = request.headers.get("loadout-signature")
        now = int(time.time())
        raw = await received(request, lambda body: payment_valid(body, signature, secret, now))
        if isinstance(raw, Response):
            return raw
        try:
            payment = parse_payment(raw)
        except BadEvent as exc:
            return _answer(400, error=str(exc))
        refunded = payment.type == "payment.refunded"
        request_ = Payment(
            key=_key("payment", payment.transaction, payment.type),
            transaction=payment.transaction, gems=payment.gems, refunded=refunded,
        )  # fmt: skip
        return await _apply(
            pool, "payments", payment.id, ask(backend, payment.user, request_), poke
        )

    async def shopify_counted(request: Request) -> Response:
        return await counted("shopify", shopify(request))

    async def payments_counted(request: Request) -> Response:
        return await counted("payments", payments(request))

    return [
        Route("/v1/webhooks/shopify", shopify_counted, methods=["POST"]),
        Route("/v1/webhooks/payments", payments_counted, methods=["POST"]),
    ]


async def _shop_event(pool: asyncpg.Pool, backend: Backend, event: ShopEvent) -> Response:
    if event.kind == "ignored":
        await outbox.record_webhook(pool, "shopify", event.webhook, "ignored")
        return _answer(200, outcome="ignored")
    found: tuple[str, str] | None = None
    if event.order is not None:
        owner = await outbox.order_owner(pool, event.order)
        found = None if owner is None else (event.order, owner)
    if found is None and event.shop_order is not None:
        found = await outbox.order_by_shop_order(pool, event.shop_order)
    if found is None:
        log.warning("shop webhook %s (%s) names no order of ours", event.webhook, event.topic)
        await outbox.record_webhook(pool, "shopify", event.webhook, "unknown order")
        return _answer(200, outcome="unknown order")
    order, user = found
    status = OrderStatus.SHIPPED if event.kind == "shipped" else OrderStatus.CANCELLED
    tracking = None
    if event.tracking is not None:
        t = event.tracking
        tracking = Tracking(t.carrier, t.number, t.url)
    request = AdvanceOrder(
        key=_key("shopify", event.webhook), order=order, status=status, tracking=tracking
    )
    answer = await _apply(pool, "shopify", event.webhook, ask(backend, user, request), lambda: None)
    if status is OrderStatus.CANCELLED and answer.status_code == 200:
        await outbox.shop_cancelled(pool, order)  # the shop cancelled it: nothing to tell it
    return answer


async def _apply(
    pool: asyncpg.Pool,
    source: str,
    event_id: str,
    asked: Awaitable[object],
    poke: Callable[[], None],
) -> Response:
    try:
        reply = await asked
    except RequestError as exc:
        if exc.code is ErrorCode.UNAVAILABLE:
            return _answer(503, error=exc.message)  # not known: the sender retries
        status = {
            ErrorCode.IDEMPOTENCY_CONFLICT: 409,
            ErrorCode.NOT_CANCELLABLE: 200,  # the order is past this: nothing to do
        }.get(exc.code, 422)
        await outbox.record_webhook(pool, source, event_id, exc.code.value)
        log.info("%s event %s: %s (%s)", source, event_id, exc.code.value, exc.message)
        return _answer(status, outcome=exc.code.value, error=exc.message)
    await outbox.record_webhook(pool, source, event_id, "applied")
    poke()
    if isinstance(reply, PaymentApplied):
        return _answer(200, outcome="applied", balance=reply.balance, debt=reply.debt)
    return _answer(200, outcome="applied")
