"""Webhook signatures (server/signatures.py): what is accepted and what is not."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import subprocess

import pytest

from server.signatures import payment_sign, payment_valid, shopify_sign, shopify_valid

BODY = b'{"id": 820982911946154508, "note_attributes": []}'
SECRET = "hush"
NOW = 1_700_000_000


def test_the_shop_signature_is_base64_hmac_sha256_of_the_raw_body() -> None:
    # Computed independently of the module, as Shopify documents it.
    expected = base64.b64encode(hmac.new(b"hush", BODY, hashlib.sha256).digest()).decode()
    assert shopify_sign(BODY, SECRET) == expected
    assert shopify_valid(BODY, expected, SECRET)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "not base64!",
        shopify_sign(BODY, "other secret"),
        shopify_sign(BODY + b" ", SECRET),
        shopify_sign(BODY, SECRET)[:-4],
        base64.b64encode(b"\x00" * 32).decode(),
        "A" * 10_000,
    ],
    ids=["missing", "empty", "garbage", "other-secret", "other-body", "cut", "zeros", "huge"],
)
def test_a_forged_or_malformed_shop_signature_is_refused(header: str | None) -> None:
    assert not shopify_valid(BODY, header, SECRET)


def test_a_changed_body_fails_the_shop_signature() -> None:
    header = shopify_sign(BODY, SECRET)
    assert not shopify_valid(BODY.replace(b"[]", b'[{"name": "loadout_order"}]'), header, SECRET)


def test_an_empty_secret_accepts_nothing() -> None:
    assert not shopify_valid(BODY, shopify_sign(BODY, ""), "")
    assert not payment_valid(BODY, payment_sign(BODY, "", NOW), "", NOW)


def test_the_payment_signature_covers_the_timestamp_and_the_body() -> None:
    header = payment_sign(BODY, SECRET, NOW)
    digest = hmac.new(b"hush", f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert header == f"t={NOW},v1={digest}"
    assert payment_valid(BODY, header, SECRET, now=NOW)
    # Within the tolerance, either way.
    assert payment_valid(BODY, header, SECRET, now=NOW + 300)
    assert payment_valid(BODY, header, SECRET, now=NOW - 300)


def test_a_stale_or_future_payment_signature_is_refused() -> None:
    header = payment_sign(BODY, SECRET, NOW)
    assert not payment_valid(BODY, header, SECRET, now=NOW + 301)
    assert not payment_valid(BODY, header, SECRET, now=NOW - 301)
    assert payment_valid(BODY, header, SECRET, now=NOW + 3600, tolerance=3600)


def test_a_replayed_signature_with_a_fresh_timestamp_is_refused() -> None:
    digest = payment_sign(BODY, SECRET, NOW).split("v1=")[1]
    later = NOW + 1000
    assert not payment_valid(BODY, f"t={later},v1={digest}", SECRET, now=later)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "garbage",
        f"t={NOW}",
        "v1=" + "00" * 32,
        f"t=abc,v1={'00' * 32}",
        f"t=-{NOW},v1={'00' * 32}",
        f"t={NOW},v1=zz",
        f"t={NOW},t={NOW},v1={'00' * 32}",
        f"t={NOW},v1={'00' * 32}",
        payment_sign(BODY, "other secret", NOW),
        payment_sign(BODY + b"x", SECRET, NOW),
        "t=" + "1" * 5000 + ",v1=00",
    ],
    ids=[
        "missing",
        "empty",
        "garbage",
        "no-v1",
        "no-t",
        "t-not-number",
        "t-negative",
        "v1-not-hex",
        "t-twice",
        "zeros",
        "other-secret",
        "other-body",
        "huge",
    ],
)
def test_a_forged_or_malformed_payment_signature_is_refused(header: str | None) -> None:
    assert not payment_valid(BODY, header, SECRET, now=NOW)


def test_any_of_several_v1_signatures_may_match() -> None:
    good = payment_sign(BODY, SECRET, NOW).split("v1=")[1]
    header = f"t={NOW},v0=abc,v1={'00' * 32},v1={good}"
    assert payment_valid(BODY, header, SECRET, now=NOW)


# The one-line commands an operator can use (docs/fulfillment.md may quote
# them): the same signatures, made with the openssl CLI.
PAYMENT_ONE_LINER = (
    'printf "t=%s,v1=%s" "$T" '
    '"$(printf "%s.%s" "$T" "$BODY" | openssl dgst -sha256 -hmac "$SECRET" -r | cut -d" " -f1)"'
)
SHOPIFY_ONE_LINER = 'printf "%s" "$BODY" | openssl dgst -sha256 -hmac "$SECRET" -binary | base64'


def shell(command: str, **env: str) -> str:
    done = subprocess.run(
        ["bash", "-c", command],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return done.stdout.strip()


def test_the_documented_one_line_commands_sign_as_we_check() -> None:
    body = '{"id":"evt_1","type":"payment.succeeded","transaction":"t1","user":"alice","gems":5}'
    header = shell(PAYMENT_ONE_LINER, T=str(NOW), BODY=body, SECRET=SECRET)
    assert header == payment_sign(body.encode(), SECRET, NOW)
    assert payment_valid(body.encode(), header, SECRET, now=NOW)
    header = shell(SHOPIFY_ONE_LINER, BODY=body, SECRET=SECRET)
    assert shopify_valid(body.encode(), header, SECRET)
