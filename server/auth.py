"""Tokens: HS256 JWTs signed with the server secret (PROTOCOL.md §1)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import jwt

from protocol.messages import Role

__all__ = ["AuthError", "Identity", "issue_token", "verify_token"]

_USER = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_MAX_TOKEN = 4096


class AuthError(Exception):
    """A token that does not let anyone in; the message is safe to log."""


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    role: Role


def issue_token(secret: str, user: str, role: Role = Role.PLAYER, ttl: int = 3600) -> str:
    if not _USER.fullmatch(user):
        raise ValueError("user ids are 1-64 characters of A-Z a-z 0-9 _ . -")
    if ttl <= 0:
        raise ValueError("ttl must be positive")
    claims = {"sub": user, "exp": int(time.time()) + ttl, "role": role.value}
    return jwt.encode(claims, secret, algorithm="HS256")


def verify_token(secret: str, token: str) -> Identity:
    if not token or len(token) > _MAX_TOKEN:
        raise AuthError("missing or oversized token")
    try:
        claims = jwt.decode(
            token, secret, algorithms=["HS256"], options={"require": ["exp", "sub"]}
        )
    except jwt.PyJWTError as exc:
        raise AuthError(f"invalid token: {type(exc).__name__}") from None
    user = claims.get("sub")
    if not isinstance(user, str) or not _USER.fullmatch(user):
        raise AuthError("invalid token: bad sub")
    try:
        role = Role(claims.get("role", Role.PLAYER.value))
    except ValueError:
        raise AuthError("invalid token: unknown role") from None
    return Identity(user, role)
