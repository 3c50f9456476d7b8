"""Tokens: HS256 JWTs signed with the server secret (PROTOCOL.md §1).

A refused token says which of ``TokenProblem`` it has, so that a client
author can tell an expired token from a forged one; the problem names the
kind of fault only, never a claim's value or anything about the secret.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from enum import StrEnum

import jwt

from protocol.messages import Role

__all__ = ["AuthError", "Identity", "TokenProblem", "issue_token", "verify_token"]

_USER = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_MAX_TOKEN = 4096


class TokenProblem(StrEnum):
    """Why a token lets no one in: the text the handshake's 401 carries."""

    MISSING = "token missing"
    MALFORMED = "token malformed"
    FORGED = "token signature invalid"
    EXPIRED = "token expired"
    NOT_YET_VALID = "token not valid yet"
    BAD_CLAIMS = "token claims invalid"
    WRONG_ROLE = "token role unknown"


class AuthError(Exception):
    """A token that does not let anyone in; the message is safe to log and
    to send (``problem`` names the fault, not the token's content)."""

    def __init__(self, problem: TokenProblem, detail: str = "") -> None:
        super().__init__(f"{problem.value}: {detail}" if detail else problem.value)
        self.problem = problem


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
    if not token:
        raise AuthError(TokenProblem.MISSING)
    if len(token) > _MAX_TOKEN:
        raise AuthError(TokenProblem.MALFORMED, "oversized")
    try:
        claims = jwt.decode(
            token, secret, algorithms=["HS256"], options={"require": ["exp", "sub"]}
        )
    except jwt.PyJWTError as exc:
        raise AuthError(_problem_of(exc), type(exc).__name__) from None
    user = claims.get("sub")
    if not isinstance(user, str) or not _USER.fullmatch(user):
        raise AuthError(TokenProblem.BAD_CLAIMS, "bad sub")
    try:
        role = Role(claims.get("role", Role.PLAYER.value))
    except ValueError:
        raise AuthError(TokenProblem.WRONG_ROLE) from None
    return Identity(user, role)


def _problem_of(exc: jwt.PyJWTError) -> TokenProblem:
    """PyJWT's exception as one of our problems (subclasses before bases)."""
    match exc:
        case jwt.ExpiredSignatureError():
            return TokenProblem.EXPIRED
        case jwt.ImmatureSignatureError():
            return TokenProblem.NOT_YET_VALID
        case jwt.InvalidSignatureError():
            return TokenProblem.FORGED
        case jwt.MissingRequiredClaimError():
            return TokenProblem.BAD_CLAIMS
        case jwt.DecodeError() | jwt.InvalidAlgorithmError():
            # Not a JWT at all, or one not signed HS256 (``alg: none``).
            return TokenProblem.MALFORMED
        case _:
            return TokenProblem.BAD_CLAIMS
