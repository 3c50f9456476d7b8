"""A client of a Shopify-compatible shop's Admin REST API (PROTOCOL.md §12):
physical goods are ordered there, and cancelled there.

Errors::

    ShopError(retryable=True)    try again later: a timeout, a refused or
                                 dropped connection, 429, a 5xx
    ShopError(retryable=False)   this call will never succeed as it is: a
                                 redirect, 401/403 (the token), 404, 422, ...

Every order carries our order id twice: as the ``Idempotency-Key`` header
(a compatible shop answers a repeat with the order it already made, so a
worker that died between the call and recording its answer places nothing
twice) and as the ``loadout_order`` note attribute, which the shop's webhooks
bring back. The access token is sent as ``X-Shopify-Access-Token`` and never
appears in an error or a ``repr``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import quote

import httpx

from server.webhook_events import ORDER_ATTRIBUTE

__all__ = ["API_VERSION", "ShopClient", "ShopError", "order_body", "shipping_address"]

#: The Admin REST API version PROTOCOL.md names.
API_VERSION: Final = "2024-10"
#: Characters of the shop's error body kept in a ``ShopError`` message.
_EXCERPT: Final = 300


class ShopError(Exception):
    """A call to the shop failed; ``retryable`` says whether trying again can help."""

    def __init__(self, message: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status


def shipping_address(address: Mapping[str, str | None]) -> dict[str, str]:
    """Our address fields (``name, line1, line2, city, region, postal_code,
    country``) as Shopify's; absent or empty fields are left out."""
    name = (address.get("name") or "").strip()
    first, _, last = name.rpartition(" ")
    mapped = {
        "name": name,
        "first_name": first.strip(),
        "last_name": last,  # a one-word name is all last name, as Shopify requires one
        "address1": address.get("line1"),
        "address2": address.get("line2"),
        "city": address.get("city"),
        "province": address.get("region"),
        "zip": address.get("postal_code"),
        "country_code": address.get("country"),
    }
    return {key: value for key, value in mapped.items() if value}


def order_body(
    order: str,
    sku: str,
    quantity: int,
    email: str | None,
    address: Mapping[str, str | None],
    *,
    title: str | None = None,
) -> dict[str, Any]:
    """The ``POST orders.json`` body of our ``order``: one custom line item,
    already paid (in gems, so at no money price at the shop)."""
    body: dict[str, Any] = {
        "line_items": [
            {
                "title": title or sku,
                "sku": sku,
                "quantity": quantity,
                "price": "0.00",
                "requires_shipping": True,
            }
        ],
        "financial_status": "paid",
        "note_attributes": [{"name": ORDER_ATTRIBUTE, "value": order}],
        "source_identifier": order,
        "tags": "loadout",
    }
    if email:
        body["email"] = email
    if address:
        body["shipping_address"] = shipping_address(address)
    return {"order": body}


class ShopClient:
    """One shop, one connection pool. ``base_url`` is the shop's root
    (``https://example.myshopify.com``); ``timeout`` bounds each phase of a
    call (connect, write, read, pool)."""

    def __init__(
        self,
        base_url: str,
        token: str,
        timeout: float = 10.0,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"X-Shopify-Access-Token": token, "Accept": "application/json"},
            timeout=timeout,
            follow_redirects=False,
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"ShopClient({self.base_url})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def place_order(
        self,
        order: str,
        sku: str,
        quantity: int,
        email: str | None,
        address: dict[str, str | None],
        *,
        title: str | None = None,
    ) -> str:
        """Places our ``order`` (idempotently) and answers the shop's order id."""
        response = await self._call(
            "POST",
            f"/admin/api/{API_VERSION}/orders.json",
            json=order_body(order, sku, quantity, email, address, title=title),
            headers={"Idempotency-Key": order},
        )
        return str(_order_of(response)["id"])

    async def cancel_order(self, shop_order: str) -> None:
        """Cancels the shop's order; one already cancelled is left as it is."""
        path = f"/admin/api/{API_VERSION}/orders/{quote(shop_order, safe='')}"
        try:
            await self._call("POST", f"{path}/cancel.json", json={})
        except ShopError as refused:
            if refused.status != 422:
                raise
            # Shopify answers 422 to a second cancel: done, if it is cancelled.
            if _order_of(await self._call("GET", f"{path}.json")).get("cancelled_at") is None:
                raise
            return

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        what = f"{method} {path}"
        try:
            response = await self._client.request(method, path, json=json, headers=headers)
        except httpx.TimeoutException as exc:
            raise ShopError(f"{what}: timed out", retryable=True) from exc
        except httpx.TransportError as exc:  # connect, read, write, protocol errors
            raise ShopError(f"{what}: {type(exc).__name__}", retryable=True) from exc
        status = response.status_code
        if 200 <= status < 300:
            return response
        retryable = status == 429 or status >= 500
        excerpt = response.text[:_EXCERPT].replace("\n", " ")
        raise ShopError(f"{what}: {status} {excerpt}", retryable=retryable, status=status)


def _order_of(response: httpx.Response) -> dict[str, Any]:
    """The ``order`` object of a shop's answer, with an ``id``."""
    try:
        order = response.json()["order"]
        if not isinstance(order, dict) or order.get("id") in (None, ""):
            raise TypeError("no order id")
    except (ValueError, KeyError, TypeError) as exc:
        # Whatever the shop did, asking again with the same key is safe.
        raise ShopError(
            f"{response.request.method} {response.request.url.path}: unexpected answer",
            retryable=True,
            status=response.status_code,
        ) from exc
    return order
