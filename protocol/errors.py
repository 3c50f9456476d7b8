"""Error codes of PROTOCOL.md §5 and the one exception that carries them.

Exception tree::

    RequestError            a request was refused; carries a public ErrorCode
                            and a message safe to show the client

Anything else raised while serving a request is a bug in Loadout and reaches
the client only as ``internal`` with no details.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ErrorCode", "RequestError"]


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    UNKNOWN_ITEM = "unknown_item"
    PRICE_CHANGED = "price_changed"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    LIMIT_EXCEEDED = "limit_exceeded"
    NOT_OWNED = "not_owned"
    INCOMPATIBLE = "incompatible"
    UNKNOWN_PROFILE = "unknown_profile"
    PROFILE_EXISTS = "profile_exists"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    # Store extensions (PROTOCOL.md §10).
    SOLD_OUT = "sold_out"
    UNKNOWN_CODE = "unknown_code"
    CODE_EXPIRED = "code_expired"
    # Fulfillment and money (PROTOCOL.md §12).
    ADDRESS_REQUIRED = "address_required"
    NOT_CANCELLABLE = "not_cancellable"
    NOT_REFUNDABLE = "not_refundable"
    UNKNOWN_ORDER = "unknown_order"


class RequestError(Exception):
    """A request refused for a reason the client may know."""

    def __init__(self, code: ErrorCode, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms
