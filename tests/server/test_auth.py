"""server/auth.py: HS256 tokens of PROTOCOL.md §1."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest

from protocol.messages import Role
from server.auth import AuthError, Identity, TokenProblem, issue_token, verify_token

# 64 bytes or more: PyJWT warns (an error under filterwarnings) about shorter HMAC keys.
SECRET = "test-secret-" + "s" * 64
OTHER_SECRET = "other-secret-" + "o" * 64


def signed(claims: dict[str, Any], secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


def later(seconds: int = 600) -> int:
    return int(time.time()) + seconds


def refused(token: str, secret: str = SECRET) -> AuthError:
    with pytest.raises(AuthError) as info:
        verify_token(secret, token)
    return info.value


@pytest.mark.parametrize("role", list(Role))
def test_issue_then_verify_round_trips_with_role(role: Role) -> None:
    token = issue_token(SECRET, "alice", role)
    assert verify_token(SECRET, token) == Identity("alice", role)


def test_issued_token_is_hs256_with_sub_exp_and_role() -> None:
    before = int(time.time())
    token = issue_token(SECRET, "bob.smith-2_x", Role.SERVICE, ttl=120)
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "bob.smith-2_x"
    assert claims["role"] == "service"
    assert before + 120 <= claims["exp"] <= int(time.time()) + 120


def test_default_role_is_player() -> None:
    assert verify_token(SECRET, issue_token(SECRET, "alice")).role is Role.PLAYER


def test_token_without_role_claim_is_a_player() -> None:
    token = signed({"sub": "alice", "exp": later()})
    assert verify_token(SECRET, token) == Identity("alice", Role.PLAYER)


def test_issue_refuses_bad_user_and_ttl() -> None:
    with pytest.raises(ValueError):
        issue_token(SECRET, "bad user")
    with pytest.raises(ValueError):
        issue_token(SECRET, "")
    with pytest.raises(ValueError):
        issue_token(SECRET, "alice", ttl=0)


def test_expired_token() -> None:
    refused(signed({"sub": "alice", "exp": int(time.time()) - 5}))


def test_wrong_secret() -> None:
    refused(issue_token(OTHER_SECRET, "alice", Role.ADMIN))


def test_alg_none() -> None:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    unsigned = (
        part({"alg": "none", "typ": "JWT"})
        + "."
        + part({"sub": "alice", "exp": later(), "role": "admin"})
    )
    refused(unsigned + ".")


def test_alg_none_in_any_case() -> None:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    for alg in ("None", "NONE", "nOnE"):
        refused(part({"alg": alg}) + "." + part({"sub": "alice", "exp": later()}) + ".")


def test_exp_that_is_not_a_number() -> None:
    refused(signed({"sub": "alice", "exp": "tomorrow"}))


def test_token_not_valid_yet() -> None:
    refused(signed({"sub": "alice", "exp": later(), "nbf": later(300)}))


def test_other_hmac_algorithm_with_the_right_secret() -> None:
    refused(signed({"sub": "alice", "exp": later()}, algorithm="HS512"))


def test_tampered_payload() -> None:
    header, _, signature = issue_token(SECRET, "alice").split(".")
    payload = (
        base64.urlsafe_b64encode(
            json.dumps({"sub": "alice", "exp": later(), "role": "admin"}).encode()
        )
        .decode()
        .rstrip("=")
    )
    refused(f"{header}.{payload}.{signature}")


def test_missing_exp() -> None:
    refused(signed({"sub": "alice"}))


def test_missing_sub() -> None:
    refused(signed({"exp": later()}))


@pytest.mark.parametrize("sub", ["", "al ice", "a/b", "a:b", "alicé", "u" * 65, 42, None])
def test_bad_sub(sub: Any) -> None:
    refused(signed({"sub": sub, "exp": later()}))


def test_sub_with_trailing_newline() -> None:
    refused(signed({"sub": "alice\n", "exp": later()}))


@pytest.mark.parametrize("role", ["root", "ADMIN", "", None, 1])
def test_unknown_role(role: Any) -> None:
    refused(signed({"sub": "alice", "exp": later(), "role": role}))


def test_oversized_token() -> None:
    token = signed({"sub": "alice", "exp": later(), "pad": "x" * 4000})
    assert len(token) > 4096
    error = refused(token)
    assert "oversized" in str(error)


def test_token_just_under_the_size_limit_is_accepted() -> None:
    token = signed({"sub": "alice", "exp": later(), "pad": "x" * 2900})
    assert 3500 < len(token) <= 4096
    assert verify_token(SECRET, token).user == "alice"


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "....", "Bearer x"])
def test_garbage_tokens(token: str) -> None:
    refused(token)


def test_error_message_does_not_echo_the_token() -> None:
    token = issue_token(OTHER_SECRET, "alice")
    assert token not in str(refused(token))


def test_a_refusal_says_which_problem_the_token_has() -> None:
    assert refused("").problem is TokenProblem.MISSING
    assert refused("not.a.jwt").problem is TokenProblem.MALFORMED
    assert refused(issue_token(OTHER_SECRET, "alice")).problem is TokenProblem.FORGED
    expired = signed({"sub": "alice", "exp": int(time.time()) - 5})
    assert refused(expired).problem is TokenProblem.EXPIRED
    assert refused(signed({"sub": "alice"})).problem is TokenProblem.BAD_CLAIMS
    assert refused(signed({"sub": "al ice", "exp": later()})).problem is TokenProblem.BAD_CLAIMS
    wrong_role = signed({"sub": "alice", "exp": later(), "role": "root"})
    assert refused(wrong_role).problem is TokenProblem.WRONG_ROLE


def test_a_refusal_leaks_neither_the_secret_nor_the_claims() -> None:
    forged = issue_token(OTHER_SECRET, "alice-secret-name")
    for error in (refused(forged), refused(forged[:-3])):
        assert SECRET not in str(error) and OTHER_SECRET not in str(error)
        assert "alice-secret-name" not in str(error)
