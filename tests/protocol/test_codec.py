"""protocol/codec.py and protocol/messages.py: decoding every request of
PROTOCOL.md §3 and §6 in both subprotocols, refusing bad frames with
``bad_request``, recovering the rid of a refused frame, and encoding replies.

No sockets: frames are built here, as a client would send them.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from protocol import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL, Codec, ErrorCode, RequestError
from protocol.codec import codec_for
from protocol.messages import (
    MAX_GEMS,
    MAX_QUANTITY,
    Catalog,
    CatalogChanged,
    CatalogItem,
    CatalogReply,
    Consume,
    Consumed,
    CreateProfile,
    Delivery,
    Equip,
    Equipped,
    Error,
    Grant,
    Granted,
    History,
    HistoryReply,
    Inspect,
    InventoryEntry,
    InventoryPush,
    ItemKind,
    ItemStatus,
    LedgerEntry,
    LoadoutPush,
    ProfileCreated,
    ProfileView,
    Purchase,
    Purchased,
    Role,
    ServerMessage,
    State,
    StateReply,
    Unequip,
    Unequipped,
    Unwatch,
    Watch,
    WatchedUser,
    Welcome,
)

JSON = codec_for(None)
MSGPACK = codec_for(MSGPACK_SUBPROTOCOL)


@pytest.fixture(params=[JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL], ids=["json", "msgpack"])
def codec(request: pytest.FixtureRequest) -> Codec:
    return codec_for(request.param)


def frame(codec: Codec, message: Any) -> str | bytes:
    """``message`` as the client would send it: a text frame of JSON or a
    binary frame of MessagePack.  Built with encoders independent of the codec."""
    if codec.binary:
        return msgspec.msgpack.encode(message)
    return json.dumps(message)


def refused(codec: Codec, data: str | bytes) -> RequestError:
    with pytest.raises(RequestError) as info:
        codec.decode_request(data)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert info.value.message
    return info.value


# --------------------------------------------------------------- codec_for


def test_codec_for_no_offer_is_json() -> None:
    assert codec_for(None) is codec_for(JSON_SUBPROTOCOL)
    assert codec_for(None).subprotocol == JSON_SUBPROTOCOL
    assert not codec_for(None).binary


def test_codec_for_msgpack_is_binary() -> None:
    assert MSGPACK.subprotocol == MSGPACK_SUBPROTOCOL
    assert MSGPACK.binary
    assert MSGPACK is not JSON


def test_codecs_are_shared_not_built_per_call() -> None:
    assert codec_for(MSGPACK_SUBPROTOCOL) is codec_for(MSGPACK_SUBPROTOCOL)


# ------------------------------------------------------- decoding requests

MINIMAL_REQUESTS: list[tuple[dict[str, Any], Any]] = [
    ({"type": "state"}, State()),
    ({"type": "catalog"}, Catalog(game=None, category=None, cursor=None, limit=50)),
    (
        {"type": "purchase", "key": "k1", "sku": "br.hat.crown", "price": 300},
        Purchase(key="k1", sku="br.hat.crown", price=300, quantity=1),
    ),
    (
        {"type": "consume", "key": "k2", "sku": "plat.life.extra"},
        Consume(key="k2", sku="plat.life.extra", quantity=1),
    ),
    ({"type": "create_profile", "profile": "alt"}, CreateProfile(profile="alt", game=None)),
    (
        {"type": "equip", "profile": "main", "slot": "hat", "sku": "br.hat.crown"},
        Equip(profile="main", slot="hat", sku="br.hat.crown"),
    ),
    ({"type": "unequip", "profile": "main", "slot": "hat"}, Unequip(profile="main", slot="hat")),
    ({"type": "history"}, History(before=None, limit=50)),
    (
        {"type": "grant", "user": "alice", "amount": 100, "key": "g1"},
        Grant(user="alice", amount=100, key="g1", reason=""),
    ),
    ({"type": "inspect", "user": "bob.smith-2_x"}, Inspect(user="bob.smith-2_x")),
]


@pytest.mark.parametrize(
    ("message", "expected"), MINIMAL_REQUESTS, ids=[m["type"] for m, _ in MINIMAL_REQUESTS]
)
def test_decodes_every_request_with_defaults(
    codec: Codec, message: dict[str, Any], expected: Any
) -> None:
    decoded = codec.decode_request(frame(codec, message))
    assert type(decoded) is type(expected)
    assert decoded == expected
    assert decoded.rid is None


FULL_REQUESTS: list[tuple[dict[str, Any], Any]] = [
    (
        {"type": "catalog", "game": "br", "category": "hats", "cursor": "YnI", "limit": 200},
        Catalog(game="br", category="hats", cursor="YnI", limit=200),
    ),
    (
        {"type": "purchase", "key": "k", "sku": "s", "price": 0, "quantity": MAX_QUANTITY},
        Purchase(key="k", sku="s", price=0, quantity=MAX_QUANTITY),
    ),
    (
        {"type": "purchase", "key": "k" * 64, "sku": "s" * 64, "price": MAX_GEMS},
        Purchase(key="k" * 64, sku="s" * 64, price=MAX_GEMS, quantity=1),
    ),
    (
        {"type": "consume", "key": "k", "sku": "s", "quantity": 7},
        Consume(key="k", sku="s", quantity=7),
    ),
    (
        {"type": "create_profile", "profile": "p" * 32, "game": "br"},
        CreateProfile(profile="p" * 32, game="br"),
    ),
    (
        {"type": "create_profile", "profile": "p", "game": None},
        CreateProfile(profile="p", game=None),
    ),
    ({"type": "history", "before": 12, "limit": 1}, History(before=12, limit=1)),
    (
        {"type": "grant", "user": "u" * 64, "amount": MAX_GEMS, "key": "g", "reason": "promo"},
        Grant(user="u" * 64, amount=MAX_GEMS, key="g", reason="promo"),
    ),
]


@pytest.mark.parametrize(
    ("message", "expected"),
    FULL_REQUESTS,
    ids=[f"{m['type']}-{i}" for i, (m, _) in enumerate(FULL_REQUESTS)],
)
def test_decodes_given_fields_and_limits_at_their_bounds(
    codec: Codec, message: dict[str, Any], expected: Any
) -> None:
    assert codec.decode_request(frame(codec, message)) == expected


@pytest.mark.parametrize("rid", ["r-1", "", "x" * 64, 0, 42, -5, 2**63 - 1, -(2**63), None])
def test_rid_is_a_short_string_or_an_integer(codec: Codec, rid: str | int | None) -> None:
    decoded = codec.decode_request(frame(codec, {"type": "state", "rid": rid}))
    assert decoded.rid == rid
    assert type(decoded.rid) is type(rid)


def test_unknown_fields_are_ignored_for_forward_compatibility(codec: Codec) -> None:
    decoded = codec.decode_request(frame(codec, {"type": "state", "rid": 1, "future": [1, 2]}))
    assert decoded == State(rid=1)


# --------------------------------------------------------------- bad requests

PURCHASE = {"type": "purchase", "rid": "p", "key": "k", "sku": "s", "price": 10}

BAD_REQUESTS: dict[str, dict[str, Any]] = {
    "rid-65-chars": {"type": "state", "rid": "x" * 65},
    "rid-float": {"type": "state", "rid": 1.5},
    "rid-bool": {"type": "state", "rid": True},
    "rid-list": {"type": "state", "rid": [1]},
    "type-unknown": {"type": "teleport", "rid": 1},
    "type-missing": {"rid": 1},
    "type-not-string": {"type": 3, "rid": 1},
    "purchase-no-key": {k: v for k, v in PURCHASE.items() if k != "key"},
    "purchase-no-sku": {k: v for k, v in PURCHASE.items() if k != "sku"},
    "purchase-no-price": {k: v for k, v in PURCHASE.items() if k != "price"},
    "purchase-price-string": {**PURCHASE, "price": "10"},
    "purchase-price-float": {**PURCHASE, "price": 10.5},
    "purchase-price-negative": {**PURCHASE, "price": -1},
    "purchase-price-over-max-gems": {**PURCHASE, "price": MAX_GEMS + 1},
    "purchase-quantity-zero": {**PURCHASE, "quantity": 0},
    "purchase-quantity-negative": {**PURCHASE, "quantity": -3},
    "purchase-quantity-over-max": {**PURCHASE, "quantity": MAX_QUANTITY + 1},
    "purchase-quantity-string": {**PURCHASE, "quantity": "2"},
    "purchase-quantity-bool": {**PURCHASE, "quantity": True},
    "purchase-quantity-null": {**PURCHASE, "quantity": None},
    "purchase-sku-65-chars": {**PURCHASE, "sku": "s" * 65},
    "purchase-sku-empty": {**PURCHASE, "sku": ""},
    "purchase-key-65-chars": {**PURCHASE, "key": "k" * 65},
    "purchase-key-empty": {**PURCHASE, "key": ""},
    "purchase-key-int": {**PURCHASE, "key": 5},
    "consume-quantity-zero": {"type": "consume", "key": "k", "sku": "s", "quantity": 0},
    "consume-quantity-over-max": {
        "type": "consume",
        "key": "k",
        "sku": "s",
        "quantity": MAX_QUANTITY + 1,
    },
    "consume-no-key": {"type": "consume", "sku": "s"},
    "create_profile-33-chars": {"type": "create_profile", "profile": "p" * 33},
    "create_profile-empty": {"type": "create_profile", "profile": ""},
    "create_profile-missing": {"type": "create_profile", "game": "br"},
    "create_profile-game-int": {"type": "create_profile", "profile": "p", "game": 1},
    "equip-no-slot": {"type": "equip", "profile": "main", "sku": "s"},
    "equip-profile-33-chars": {"type": "equip", "profile": "p" * 33, "slot": "h", "sku": "s"},
    "equip-sku-65-chars": {"type": "equip", "profile": "main", "slot": "h", "sku": "s" * 65},
    "unequip-no-profile": {"type": "unequip", "slot": "hat"},
    "catalog-limit-0": {"type": "catalog", "limit": 0},
    "catalog-limit-201": {"type": "catalog", "limit": 201},
    "catalog-limit-string": {"type": "catalog", "limit": "10"},
    "catalog-cursor-int": {"type": "catalog", "cursor": 5},
    "history-limit-0": {"type": "history", "limit": 0},
    "history-limit-201": {"type": "history", "limit": 201},
    "history-before-0": {"type": "history", "before": 0},
    "grant-amount-0": {"type": "grant", "user": "alice", "amount": 0, "key": "k"},
    "grant-amount-over-max": {"type": "grant", "user": "alice", "amount": MAX_GEMS + 1, "key": "k"},
    "grant-no-key": {"type": "grant", "user": "alice", "amount": 1},
    "grant-user-space": {"type": "grant", "user": "al ice", "amount": 1, "key": "k"},
    "grant-user-slash": {"type": "grant", "user": "a/b", "amount": 1, "key": "k"},
    "grant-user-empty": {"type": "grant", "user": "", "amount": 1, "key": "k"},
    "grant-user-65-chars": {"type": "grant", "user": "u" * 65, "amount": 1, "key": "k"},
    "grant-user-unicode": {"type": "grant", "user": "alicé", "amount": 1, "key": "k"},
    "inspect-no-user": {"type": "inspect"},
    "inspect-user-int": {"type": "inspect", "user": 7},
    "inspect-user-colon": {"type": "inspect", "user": "a:b"},
}


@pytest.mark.parametrize("message", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_requests_are_refused_with_bad_request(codec: Codec, message: dict[str, Any]) -> None:
    refused(codec, frame(codec, message))


# MessagePack integers stop at 64 bits, so the JSON codec is the one that can
# be sent integers of any size.
HUGE = 10**30
HUGE_INTEGERS: dict[str, dict[str, Any]] = {
    "purchase-price": {**PURCHASE, "price": HUGE},
    "purchase-quantity": {**PURCHASE, "quantity": HUGE},
    "purchase-negative-quantity": {**PURCHASE, "quantity": -HUGE},
    "grant-amount": {"type": "grant", "user": "alice", "amount": HUGE, "key": "k"},
    "catalog-limit": {"type": "catalog", "limit": HUGE},
    "history-before": {"type": "history", "before": HUGE},
}


@pytest.mark.parametrize("message", HUGE_INTEGERS.values(), ids=HUGE_INTEGERS.keys())
def test_huge_integers_are_refused(message: dict[str, Any]) -> None:
    refused(JSON, json.dumps(message))


@pytest.mark.parametrize("field", ["price", "quantity"])
def test_largest_msgpack_integers_are_refused(field: str) -> None:
    refused(MSGPACK, msgspec.msgpack.encode({**PURCHASE, field: 2**64 - 1}))
    refused(MSGPACK, msgspec.msgpack.encode({**PURCHASE, field: -(2**63)}))


@pytest.mark.parametrize(
    "rid", [HUGE, 2**64, 2**63, -(2**63) - 1], ids=["1e30", "2**64", "2**63", "-2**63-1"]
)
def test_rid_outside_64_bits_is_refused(rid: int) -> None:
    refused(JSON, json.dumps({"type": "state", "rid": rid}))


@pytest.mark.parametrize(
    "message",
    [
        {"type": "grant", "user": "alice\n", "amount": 1, "key": "k"},
        {"type": "inspect", "user": "alice\n"},
    ],
    ids=["grant", "inspect"],
)
def test_user_id_with_trailing_newline_is_refused(codec: Codec, message: dict[str, Any]) -> None:
    refused(codec, frame(codec, message))


@pytest.mark.parametrize(
    "message",
    [
        {"type": "purchase", "key": "a\x00b", "sku": "plat.booster.xp", "price": 5},
        {"type": "consume", "key": "\x00", "sku": "plat.life.extra"},
        {"type": "grant", "user": "alice", "amount": 1, "key": "k\x00"},
        {"type": "redeem", "key": "\x00\x00", "code": "WINTER-CUP"},
    ],
    ids=["purchase", "consume", "grant", "redeem"],
)
def test_idempotency_key_with_nul_is_refused(codec: Codec, message: dict[str, Any]) -> None:
    """PostgreSQL text cannot hold NUL: such a key would fail its whole group commit."""
    refused(codec, frame(codec, message))


@pytest.mark.parametrize("key", ["k", "a\nb", "\u202e\U0001f600", "é" * 64, " "])
def test_other_idempotency_keys_are_taken(codec: Codec, key: str) -> None:
    request = codec.decode_request(frame(codec, {"type": "consume", "key": key, "sku": "s"}))
    assert isinstance(request, Consume) and request.key == key


GARBAGE_JSON = ["", "not json", "{", '{"type": "state"', "[1, 2]", '"state"', "null", "42"]
GARBAGE_MSGPACK = [
    b"",
    b"\xc1",
    b"\x81",
    msgspec.msgpack.encode([1, 2]),
    msgspec.msgpack.encode("state"),
    msgspec.msgpack.encode(None),
]


@pytest.mark.parametrize("data", GARBAGE_JSON)
def test_json_garbage_is_bad_request_without_rid(data: str) -> None:
    refused(JSON, data)
    assert JSON.rid_of(data) is None


@pytest.mark.parametrize("data", GARBAGE_MSGPACK)
def test_msgpack_garbage_is_bad_request_without_rid(data: bytes) -> None:
    refused(MSGPACK, data)
    assert MSGPACK.rid_of(data) is None


def test_json_codec_refuses_binary_frames() -> None:
    error = refused(JSON, json.dumps({"type": "state", "rid": 1}).encode())
    assert "binary" in error.message


def test_msgpack_codec_refuses_text_frames() -> None:
    error = refused(MSGPACK, json.dumps({"type": "state", "rid": 1}))
    assert "text" in error.message


def test_msgpack_rid_of_a_text_frame_is_none() -> None:
    assert MSGPACK.rid_of(json.dumps({"type": "state", "rid": 1})) is None


DEEP = 2000  # 4 KB of brackets: well under the 64 KiB frame limit


def test_deeply_nested_json_is_bad_request() -> None:
    refused(JSON, '{"type": "state", "x": ' + "[" * DEEP + "]" * DEEP + "}")


def test_rid_of_deeply_nested_rid_is_none() -> None:
    assert JSON.rid_of('{"rid": ' + "[" * DEEP + "]" * DEEP + "}") is None


# ----------------------------------------------------------- rid recovery


@pytest.mark.parametrize("rid", ["p-17", 17, "x" * 64, 0], ids=["str", "int", "str-64", "zero"])
@pytest.mark.parametrize(
    "message",
    [
        {"type": "purchase", "key": "k", "sku": "s", "price": -1},
        {"type": "purchase", "key": "k", "sku": "s"},
        {"type": "consume", "key": "k", "sku": "s", "quantity": 0},
        {"type": "teleport"},
        {"type": "catalog", "limit": 201},
        {"type": "grant", "user": "bad user", "amount": 1, "key": "k"},
        {"type": 5},
        {},
    ],
    ids=[
        "negative-price",
        "missing-price",
        "zero-quantity",
        "unknown-type",
        "limit-201",
        "bad-user",
        "type-int",
        "no-type",
    ],
)
def test_rid_of_recovers_the_rid_of_a_refused_object(
    codec: Codec, message: dict[str, Any], rid: str | int
) -> None:
    data = frame(codec, {**message, "rid": rid})
    refused(codec, data)
    recovered = codec.rid_of(data)
    assert recovered == rid
    assert type(recovered) is type(rid)


@pytest.mark.parametrize("rid", ["x" * 65, 1.5, True, False, [1], {"a": 1}, None], ids=repr)
def test_rid_of_ignores_an_unusable_rid(codec: Codec, rid: Any) -> None:
    data = frame(codec, {"type": "purchase", "rid": rid, "price": -1})
    refused(codec, data)
    assert codec.rid_of(data) is None


def test_rid_of_a_json_binary_frame_still_reads_the_rid() -> None:
    # The JSON codec refuses binary frames; the error can still echo the rid.
    assert JSON.rid_of(b'{"type": "state", "rid": "r"}') == "r"


# --------------------------------------------------------------- encoding

ITEM = CatalogItem(
    sku="br.rifle.dragon",
    name="Dragon Rifle Skin",
    game="br",
    category="weapon_skins",
    kind=ItemKind.NON_CONSUMABLE,
    delivery=Delivery.IN_GAME,
    price=500,
    slot="weapon_skin",
    stackable=False,
    max_quantity=1,
    status=ItemStatus.ACTIVE,
    metadata={"rarity": "legendary", "tags": ["a", "b"], "level": 3},
)

SERVER_MESSAGES: list[ServerMessage] = [
    Welcome(user="alice", role=Role.ADMIN, protocol=1, server_time=1_767_225_600_000),
    StateReply(
        rid="s-1",
        user="alice",
        version=4,
        balance=1200,
        inventory=[
            InventoryEntry("br.rifle.dragon", 1),
            InventoryEntry("plat.life.extra", 3, 1_767_225_600_000),
        ],
        profiles=[
            ProfileView("main", None, {"weapon_skin": "br.rifle.dragon"}),
            ProfileView("br-main", "br", {}),
        ],
    ),
    CatalogReply(rid=2, version=3, items=[ITEM], next="YnIucmlmbGUuZHJhZ29u"),
    CatalogReply(rid=None, version=3, items=[], next=None),
    Purchased(
        rid="p", purchase="pur-1", sku="br.hat.crown", quantity=2, total=600, balance=0, version=5
    ),
    Consumed(rid=9, sku="plat.life.extra", quantity=0, version=6),
    ProfileCreated(rid="c", profile="alt", game=None, version=7),
    Equipped(rid="e", profile="main", slot="hat", sku="br.hat.crown", version=8),
    Unequipped(rid="u", profile="main", slot="hat", version=9),
    HistoryReply(
        rid="h",
        entries=[
            LedgerEntry(seq=2, at=1, kind="purchase", amount=-600, balance=0, sku="s", quantity=2),
            LedgerEntry(seq=1, at=0, kind="grant", amount=600, balance=600, key="g"),
        ],
        next=1,
    ),
    Granted(rid="g", user="bob", balance=MAX_GEMS, version=1),
    Error(rid=None, code="bad_request", message="frame is not a valid message"),
    Error(rid="r", code="rate_limited", message="too many requests", retry_after_ms=250),
    InventoryPush(version=10, balance=5, items=[InventoryEntry("s", 0)]),
    LoadoutPush(version=11, profile="main", game=None, equipped={"hat": "br.hat.crown"}),
    CatalogChanged(version=12),
]


@pytest.mark.parametrize("message", SERVER_MESSAGES, ids=lambda m: type(m).__name__)
def test_encode_then_decode_server_round_trips(codec: Codec, message: ServerMessage) -> None:
    data = codec.encode(message)
    decoded = codec.decode_server(data)
    assert type(decoded) is type(message)
    assert decoded == message


def test_encoded_frames_use_the_subprotocol_format() -> None:
    message = Granted(rid="g", user="bob", balance=3, version=1)
    assert json.loads(JSON.encode(message)) == {
        "type": "granted",
        "rid": "g",
        "user": "bob",
        "balance": 3,
        "version": 1,
    }
    assert msgspec.msgpack.decode(MSGPACK.encode(message))["type"] == "granted"


def wire(codec: Codec, data: bytes) -> Any:
    return msgspec.msgpack.decode(data) if codec.binary else json.loads(data)


def test_error_encodes_rid_even_when_none(codec: Codec) -> None:
    data = codec.encode_error(None, RequestError(ErrorCode.BAD_REQUEST, "nope"))
    decoded = wire(codec, data)
    assert "rid" in decoded
    assert decoded["rid"] is None
    assert decoded["type"] == "error"
    assert decoded["code"] == "bad_request"
    assert decoded["message"] == "nope"
    direct = wire(codec, codec.encode(Error(rid=None, code="internal", message="internal error")))
    assert "rid" in direct and direct["rid"] is None


def test_error_carries_rid_and_retry_after(codec: Codec) -> None:
    error = RequestError(ErrorCode.RATE_LIMITED, "slow down", retry_after_ms=120)
    decoded = wire(codec, codec.encode_error(17, error))
    assert decoded["rid"] == 17
    assert decoded["code"] == "rate_limited"
    assert decoded["retry_after_ms"] == 120
    assert codec.decode_server(codec.encode_error("r", error)) == Error(
        rid="r", code="rate_limited", message="slow down", retry_after_ms=120
    )


# --------------------------------------------------------------- watching


@pytest.mark.parametrize("subprotocol", [JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL])
def test_watch_and_unwatch_decode_with_their_defaults(subprotocol: str) -> None:
    codec = Codec(subprotocol)

    def frame(message: dict[str, Any]) -> bytes | str:
        data = codec.encode_any(message)
        return data if codec.binary else data.decode()

    watch = codec.decode_request(frame({"type": "watch", "rid": 1, "users": ["alice", "bob"]}))
    assert watch == Watch(rid=1, users=["alice", "bob"], inventory=False)
    unwatch = codec.decode_request(frame({"type": "unwatch", "users": ["bob"]}))
    assert unwatch == Unwatch(users=["bob"])


@pytest.mark.parametrize("users", [[], ["u"] * 501, ["not a user"], ["x" * 65], "alice", [1]])
def test_watch_refuses_users_out_of_range(users: Any) -> None:
    codec = codec_for(JSON_SUBPROTOCOL)
    for kind in ("watch", "unwatch"):
        with pytest.raises(RequestError) as info:
            codec.decode_request(json.dumps({"type": kind, "rid": 3, "users": users}))
        assert info.value.code is ErrorCode.BAD_REQUEST


def test_pushes_carry_user_only_when_set() -> None:
    """A player's own pushes look as they did before watching existed."""
    loadout = LoadoutPush(4, "main", None, {"frame": "plat.frame.gold"})
    assert "user" not in json.loads(msgspec.json.encode(loadout))
    assert "user" not in msgspec.msgpack.decode(msgspec.msgpack.encode(InventoryPush(2, 5, [])))
    watched = msgspec.structs.replace(loadout, user="alice")
    assert json.loads(msgspec.json.encode(watched))["user"] == "alice"


def test_a_watched_users_snapshot_leaves_out_what_was_not_asked() -> None:
    main = ProfileView("main", None, {})
    bare = json.loads(msgspec.json.encode(WatchedUser("alice", 0, [main])))
    assert bare == {"user": "alice", "version": 0, "profiles": [msgspec.to_builtins(main)]}
    full = json.loads(msgspec.json.encode(WatchedUser("alice", 0, [main], 0, [])))
    assert (full["balance"], full["inventory"]) == (0, [])
