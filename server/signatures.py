"""Signatures of inbound webhooks (PROTOCOL.md §12), pure and stdlib only.

Two schemes:

- the shop's (Shopify's): ``X-Shopify-Hmac-Sha256`` is the base64 HMAC-SHA256
  of the raw body with the webhook secret;
- the payment provider's: ``Loadout-Signature: t=<unix seconds>,v1=<hex>``
  where ``<hex>`` is the HMAC-SHA256 of ``"<t>." + raw body``. The timestamp
  is signed with the body, so a captured delivery cannot be replayed after the
  tolerance; several ``v1`` entries are accepted (a provider rotating its
  secret signs with both).

Every check runs on the raw bytes, before any parsing, and compares in
constant time. A check never raises on a bad header: it answers ``False``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

__all__ = ["payment_sign", "payment_valid", "shopify_sign", "shopify_valid"]

#: Longest header considered; anything longer is malformed, not parsed.
MAX_HEADER = 4096


def _digest(raw: bytes, secret: str) -> bytes:
    return hmac.new(secret.encode(), raw, hashlib.sha256).digest()


def shopify_sign(raw: bytes, secret: str) -> str:
    """The ``X-Shopify-Hmac-Sha256`` value of ``raw``: base64 of its HMAC-SHA256."""
    return base64.b64encode(_digest(raw, secret)).decode("ascii")


def shopify_valid(raw: bytes, header: str | None, secret: str) -> bool:
    """Whether ``header`` is the shop's signature of ``raw`` under ``secret``."""
    if not header or not secret or len(header) > MAX_HEADER:
        return False
    try:
        given = base64.b64decode(header.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(given, _digest(raw, secret))


def _payment_digest(raw: bytes, secret: str, t: int) -> bytes:
    return _digest(f"{t}.".encode() + raw, secret)


def payment_sign(raw: bytes, secret: str, t: int) -> str:
    """The ``Loadout-Signature`` value of ``raw`` sent at unix time ``t``."""
    return f"t={t},v1={_payment_digest(raw, secret, t).hex()}"


def _payment_parts(header: str) -> tuple[int, list[bytes]] | None:
    """``(t, [v1 digests])`` of a well-formed header, else ``None``."""
    t: int | None = None
    v1: list[bytes] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            return None
        if key == "t":
            if t is not None or not value.isascii() or not value.isdigit():
                return None
            t = int(value)
        elif key == "v1":
            try:
                v1.append(bytes.fromhex(value))
            except ValueError:
                return None
        # Other schemes (v0, ...) are ignored, as providers add them over time.
    if t is None or not v1:
        return None
    return t, v1


def payment_valid(
    raw: bytes, header: str | None, secret: str, now: int, tolerance: int = 300
) -> bool:
    """Whether ``header`` signs ``raw`` under ``secret`` within ``tolerance``
    seconds of ``now`` (either way: a clock far in the future is as suspect
    as a stale delivery)."""
    if not header or not secret or len(header) > MAX_HEADER:
        return False
    parts = _payment_parts(header)
    if parts is None:
        return False
    t, candidates = parts
    if abs(now - t) > tolerance:
        return False
    expected = _payment_digest(raw, secret, t)
    # Every candidate is compared (no early exit), each in constant time.
    matches = [hmac.compare_digest(given, expected) for given in candidates]
    return any(matches)
