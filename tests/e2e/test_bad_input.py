"""Bad input (PROTOCOL.md §5): each gets its error code, changes nothing,
and the connection stays open; persistent abuse and huge frames close it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import urllib.error
import urllib.request

import msgspec
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from protocol.messages import Role
from server.auth import Identity, verify_token
from tests.e2e.support import SECRET, Client, ServerProcess, fund, new_user

BAD_FRAMES: list[tuple[str, object]] = [
    ("garbage", "}{ not json"),
    ("not an object", [1, 2, 3]),
    ("no type", {"rid": 1}),
    ("unknown type", {"type": "teleport", "rid": 2}),
    ("missing field", {"type": "purchase", "rid": 3, "sku": "plat.booster.xp", "price": 5}),
    ("wrong type", {"type": "purchase", "rid": 4, "key": "k", "sku": "plat.booster.xp",
                    "price": "5"}),
    ("negative quantity", {"type": "purchase", "rid": 5, "key": "k", "sku": "plat.booster.xp",
                           "price": 5, "quantity": -1}),
    ("zero quantity", {"type": "consume", "rid": 6, "key": "k", "sku": "plat.booster.xp",
                       "quantity": 0}),
    ("huge number", {"type": "purchase", "rid": 7, "key": "k", "sku": "plat.booster.xp",
                     "price": 2**64 - 1}),
    ("negative price", {"type": "purchase", "rid": 8, "key": "k", "sku": "plat.booster.xp",
                        "price": -5}),
    ("overlong sku", {"type": "purchase", "rid": 9, "key": "k", "sku": "s" * 65, "price": 5}),
    ("overlong key", {"type": "purchase", "rid": 10, "key": "k" * 65, "sku": "x", "price": 5}),
    ("overlong profile", {"type": "create_profile", "rid": 11, "profile": "p" * 33}),
    ("limit out of range", {"type": "catalog", "rid": 12, "limit": 201}),
    ("float rid", {"type": "state", "rid": 1.5}),
]  # fmt: skip


@pytest.mark.parametrize("binary", [False, True], ids=["json", "msgpack"])
async def test_bad_frames_get_bad_request_and_change_nothing(
    server: ServerProcess, binary: bool
) -> None:
    user = new_user()
    await fund(server, user, 100)
    async with await Client.open(server, user, binary=binary) as c:
        before = await c.request({"type": "state", "rid": "before"})
        for name, frame in BAD_FRAMES[:10]:  # 10: the most a minute allows
            if isinstance(frame, str):
                await c.send_raw(frame if not binary else frame.encode())
            else:
                await c.send_raw(c.encode(frame))
            reply = await c.recv()
            assert reply["type"] == "error" and reply["code"] == "bad_request", (name, reply)
            expected_rid = frame.get("rid") if isinstance(frame, dict) else None
            assert reply["rid"] == expected_rid, (name, reply)
        after = await c.request({"type": "state", "rid": "after"})
        assert {**after, "rid": None} == {**before, "rid": None}


@pytest.mark.parametrize("binary", [False, True], ids=["json", "msgpack"])
async def test_a_key_with_nul_is_refused_before_the_journal(
    server: ServerProcess, binary: bool
) -> None:
    """PostgreSQL text cannot hold NUL: a key with one, let through, would
    fail the group commit it went into, with every other user's changes in it."""
    user = new_user()
    await fund(server, user, 100)
    async with await Client.open(server, user, binary=binary) as c:
        before = await c.request({"type": "state", "rid": "before"})
        purchase = {"type": "purchase", "key": "a\x00b", "sku": "plat.booster.xp", "price": 5}
        assert (await c.request(purchase))["code"] == "bad_request"
        after = await c.request({"type": "state", "rid": "after"})
        assert {**after, "rid": None} == {**before, "rid": None}
        good = {"type": "purchase", "key": "a-b", "sku": "plat.booster.xp", "price": 5}
        assert (await c.request(good))["type"] == "purchased"


async def test_more_bad_frames_within_the_limit(server: ServerProcess) -> None:
    async with await Client.open(server, new_user()) as c:
        for name, frame in BAD_FRAMES[10:]:
            await c.send_raw(c.encode(frame))
            reply = await c.recv()
            assert reply["code"] == "bad_request", (name, reply)
        assert (await c.request({"type": "state"}))["type"] == "state"


async def test_wrong_frame_kind_is_bad_request(server: ServerProcess) -> None:
    async with await Client.open(server, new_user()) as c:
        await c.send_raw(msgspec.msgpack.encode({"type": "state", "rid": 1}))  # binary on JSON
        assert (await c.recv())["code"] == "bad_request"
        assert (await c.request({"type": "state"}))["type"] == "state"


async def test_eleven_bad_frames_in_a_minute_close_1008(server: ServerProcess) -> None:
    async with await Client.open(server, new_user()) as c:
        for _ in range(11):
            await c.send_raw("nope")
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(12):
                await c.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_frames_over_64_kib_close_1009(server: ServerProcess) -> None:
    async with await Client.open(server, new_user()) as c:
        await c.send_raw('{"type":"state","pad":"' + "x" * (64 * 1024) + '"}')
        with pytest.raises(ConnectionClosed) as closed:
            await c.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def test_player_sending_admin_requests_stays_connected(server: ServerProcess) -> None:
    async with await Client.open(server, new_user()) as c:
        for _ in range(12):  # refusals are not bad frames
            reply = await c.request({"type": "grant", "user": "x", "amount": 1, "key": "k"})
            assert reply["code"] == "forbidden"
        assert (await c.request({"type": "state"}))["type"] == "state"


@pytest.mark.parametrize(
    "token",
    ["", "not-a-jwt", "FORGED"],
    ids=["missing", "malformed", "forged"],
)
async def test_bad_tokens_are_refused_with_401(server: ServerProcess, token: str) -> None:
    if token == "FORGED":
        import jwt

        token = jwt.encode({"sub": "mallory", "exp": 4_000_000_000}, "wrong-secret" * 4, "HS256")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with pytest.raises(InvalidStatus) as refused:
        async with connect(server.url, additional_headers=headers):
            pass
    assert refused.value.response.status_code == 401


def _token(claims: dict[str, object], key: str = SECRET, alg: str = "HS256") -> str:
    """A JWT built by hand, as an attacker would: any header, any claims, signed
    with ``key`` by HMAC-SHA256/512 (``alg`` none: no signature at all)."""

    def part(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    signed = f"{part({'alg': alg, 'typ': 'JWT'})}.{part(claims)}"
    if alg.lower() == "none":
        return f"{signed}."
    digest = {"HS256": hashlib.sha256, "HS512": hashlib.sha512}[alg]
    mac = hmac.new(key.encode(), signed.encode(), digest).digest()
    return f"{signed}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"


_LATER = 4_000_000_000  # an exp in 2096
#: Tokens a client might forge or keep, each refused at the handshake (PROTOCOL.md §1).
HOSTILE_TOKENS: dict[str, str] = {
    "forged": _token({"sub": "mallory", "exp": _LATER}, key="wrong-secret" * 4),
    "expired": _token({"sub": "late", "exp": 1_000_000_000}),
    "alg none": _token({"sub": "eve", "exp": _LATER}, alg="none"),
    "alg None": _token({"sub": "eve", "exp": _LATER, "role": "admin"}, alg="None"),
    "alg none with a signature": _token({"sub": "eve", "exp": _LATER}, alg="none") + "c2ln",
    "other algorithm": _token({"sub": "eve", "exp": _LATER}, alg="HS512"),
    "unknown role": _token({"sub": "eve", "exp": _LATER, "role": "root"}),
    "role in capitals": _token({"sub": "eve", "exp": _LATER, "role": "ADMIN"}),
    "role not a string": _token({"sub": "eve", "exp": _LATER, "role": 2}),
    "sub with a space": _token({"sub": "e ve", "exp": _LATER}),
    "sub too long": _token({"sub": "e" * 65, "exp": _LATER}),
    "sub not ascii": _token({"sub": "ève", "exp": _LATER}),
    "sub a number": _token({"sub": 7, "exp": _LATER}),
    "no exp": _token({"sub": "eve"}),
    "exp not a number": _token({"sub": "eve", "exp": "never"}),
    "not yet valid": _token({"sub": "eve", "exp": _LATER, "nbf": _LATER - 1}),
}


def test_the_hostile_tokens_would_pass_but_for_what_they_break() -> None:
    """A control: the same hand-made token, signed right, gets in (the check
    that refuses each hostile one is the one it names)."""
    assert verify_token(SECRET, _token({"sub": "eve", "exp": _LATER, "role": "admin"})) == (
        Identity("eve", Role.ADMIN)
    )


@pytest.mark.parametrize("where", ["header", "query"])
@pytest.mark.parametrize("name", sorted(HOSTILE_TOKENS))
async def test_hostile_tokens_are_refused_with_401(
    server: ServerProcess, name: str, where: str
) -> None:
    token = HOSTILE_TOKENS[name]
    url, headers = server.url, {}
    if where == "header":
        headers["Authorization"] = f"Bearer {token}"
    else:
        url = f"{url}?token={token}"
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, additional_headers=headers):
            pass
    assert refused.value.response.status_code == 401


async def test_a_player_may_not_grant_to_or_inspect_another_user(server: ServerProcess) -> None:
    victim = new_user()
    await fund(server, victim, 100)
    async with await Client.open(server, victim) as c:
        before = await c.request({"type": "state", "rid": "x"})
    async with await Client.open(server, new_user()) as mallory:
        grant = {"type": "grant", "user": victim, "amount": 10**6, "key": "gift"}
        assert (await mallory.request(grant))["code"] == "forbidden"
        assert (await mallory.request({"type": "inspect", "user": victim}))["code"] == "forbidden"
    async with await Client.open(server, victim) as c:
        assert await c.request({"type": "state", "rid": "x"}) == before


async def test_expired_token_and_query_token(server: ServerProcess) -> None:
    expired = server.token("late", ttl=1)
    await asyncio.sleep(2.1)
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"{server.url}?token={expired}"):
            pass
    assert refused.value.response.status_code == 401
    good = server.token("browser-user", Role.PLAYER)
    async with connect(f"{server.url}?token={good}") as ws:
        welcome = msgspec.json.decode(await ws.recv())
        assert welcome["user"] == "browser-user"


def test_healthz_and_unknown_paths(server: ServerProcess) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as r:
        assert r.status == 200
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/nope", timeout=5)
    assert missing.value.code == 404


async def test_rate_limit(ray_address: str, tmp_path: object) -> None:
    """A small limit (operators tune it) refuses with retry_after_ms."""
    from pathlib import Path

    from tests.e2e.support import ServerProcess as Proc

    proc = Proc(Path(str(tmp_path)) / "d", ray_address,
                env={"LOADOUT_RATE_PER_SECOND": "1", "LOADOUT_RATE_BURST": "5"})  # fmt: skip
    proc.start()
    try:
        async with await Client.open(proc, new_user()) as c:
            replies = [await c.request({"type": "state"}) for _ in range(7)]
            limited = [r for r in replies if r["type"] == "error"]
            assert [r["type"] for r in replies[:5]] == ["state"] * 5
            assert limited and all(r["code"] == "rate_limited" for r in limited)
            assert all(r["retry_after_ms"] > 0 for r in limited)
    finally:
        proc.stop()
        proc.kill_actors()


async def test_connection_limit(ray_address: str, tmp_path: object) -> None:
    from pathlib import Path

    proc = ServerProcess(Path(str(tmp_path)) / "d", ray_address,
                         env={"LOADOUT_MAX_CONNECTIONS": "2"})  # fmt: skip
    proc.start()
    try:
        async with await Client.open(proc, new_user()), await Client.open(proc, new_user()):
            with pytest.raises(InvalidStatus) as refused:
                await Client.open(proc, new_user())
            assert refused.value.response.status_code == 503
        for _ in range(50):  # room again, once the server has seen the closes
            try:
                c = await Client.open(proc, new_user())
                break
            except InvalidStatus:
                await asyncio.sleep(0.1)
        async with c:
            assert (await c.request({"type": "state"}))["type"] == "state"
    finally:
        proc.stop()
        proc.kill_actors()
