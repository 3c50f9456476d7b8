"""Frames for the gateway fuzz (tests/e2e/test_fuzz.py): what they are made
of, and the two ways of making them.

Every frame is built by ``request_frame`` or ``garbage_frame`` from a
``Chooser``.  ``Drawn`` makes each choice a Hypothesis draw: Hypothesis
steers those frames towards its edge cases, at about a millisecond a frame
here.  ``Seeded`` makes the choices with a ``random.Random`` that Hypothesis
seeds, at a few microseconds: it gives the fuzz its volume (100,000 frames
through Hypothesis' own draws would take minutes).  Both build the same
kinds of frames.

Which values are invalid is decided here from the request types
(``msgspec.inspect``) by ``valid_for``, written out rather than asked of the
decoder under test.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import msgspec
from hypothesis import strategies as st
from msgspec import inspect as mi

from protocol.countries import COUNTRIES
from protocol.messages import ClientMessage
from protocol.money import Address

__all__ = [
    "HARMLESS",
    "INVALID",
    "MAX_FRAME",
    "REQUESTS",
    "VALID",
    "Drawn",
    "Frame",
    "Seeded",
    "encode",
    "frames",
    "garbage_frame",
    "request_frame",
    "size",
    "valid_for",
]

MAX_FRAME = 64 * 1024
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1
_T = TypeVar("_T")

#: Requests that change nothing whoever makes them (a player's ``grant`` and
#: ``inspect`` are refused), and what each may be answered with.
HARMLESS: dict[str, set[str]] = {
    "state": {"state"},
    "catalog": {"catalog", "error:bad_request"},  # a cursor it never gave out
    "categories": {"categories"},
    "history": {"history"},
    "grant": {"error:forbidden"},
    "inspect": {"error:forbidden"},
    "orders": {"orders"},
    "cancel_order": {"error:unknown_order"},  # no such order
    "refund": {"error:forbidden"},
    "retry_order": {"error:forbidden"},
    "ship_order": {"error:forbidden"},
}


# ------------------------------------------------------------- the values


def valid_for(kind: mi.Type, value: Any) -> bool:
    """Whether a field of type ``kind`` accepts ``value`` (strictly)."""
    match kind:
        case mi.UnionType(types=types):
            return any(valid_for(t, value) for t in types)
        case mi.NoneType():
            return value is None
        case mi.IntType(ge=ge, le=le):
            return (
                isinstance(value, int)
                and not isinstance(value, bool)
                and _INT64_MIN <= value <= _UINT64_MAX
                and (ge is None or value >= ge)
                and (le is None or value <= le)
            )
        case mi.StrType(min_length=low, max_length=high, pattern=pattern):
            return (
                isinstance(value, str)
                and (low is None or len(value) >= low)
                and (high is None or len(value) <= high)
                and (pattern is None or re.search(pattern, value) is not None)
            )
        case mi.BoolType():
            return isinstance(value, bool)
        case mi.ListType(item_type=item, min_length=low, max_length=high):
            return (
                isinstance(value, list)
                and (low is None or len(value) >= low)
                and (high is None or len(value) <= high)
                and all(valid_for(item, v) for v in value)
            )
        case mi.StructType(fields=fields):
            if not isinstance(value, dict):
                return False
            known = {f.encode_name: f for f in fields}
            return (
                all(f.encode_name in value for f in fields if f.required)
                and all(k in known and valid_for(known[k].type, v) for k, v in value.items())
                and (kind.cls is not Address or value["country"] in COUNTRIES)
            )
    raise AssertionError(f"the fuzz does not know the type {kind!r}: teach valid_for")


def _candidates(kind: mi.Type) -> list[Any]:
    """Values around the limits of ``kind`` and of every other type."""
    out: list[Any] = [None, True, False, 0, -1, 1.5, -0.0, 1e300, "", "7", [], [1], {}, {"a": 1}]
    out += [2**64, -(2**64), 2**64 - 1, 2**63, -(2**63) - 1, 10**30]
    for member in kind.types if isinstance(kind, mi.UnionType) else (kind,):
        match member:
            case mi.IntType(ge=ge, le=le):
                out += [v for v in (ge, le) if v is not None]
                out += [ge - 1] if ge is not None else []
                out += [le + 1, float(le)] if le is not None else []
            case mi.StrType(min_length=low, max_length=high):
                if high is not None:
                    out += ["x" * (high + 1), "é" * (high + 1), "😀" * (high + 1), "x" * high]
                if low:
                    out += ["x" * (low - 1)]
                out += ["a b", "a/b", "é", "\u202eabc", "a\x00b", "A" * 65, "line\n"]
            case mi.StructType(fields=fields):
                whole = {f.encode_name: VALID[f.encode_name] for f in fields if f.required}
                out += [whole, {**whole, "extra": 1}, {**whole, "country": "ZZ"}]
                out += [{k: v for k, v in whole.items() if k != name} for name in whole]
                out += [{**whole, name: bad} for name in whole for bad in ("", "\x00", 7)]
            case mi.ListType(item_type=item, max_length=high):
                inner = [v for v in _candidates(item) if not isinstance(v, list | dict)][:12]
                out += [[v] for v in inner]
                if high is not None:
                    out += [["u"] * (high + 1), ["u"] * high]
    return out


#: Every request type of protocol/messages.py, by tag.
REQUESTS: dict[str, mi.StructType] = {
    str(t.tag): t
    for t in mi.type_info(ClientMessage).types  # type: ignore[attr-defined]
}
#: A valid value for each field name used by any request (none changes anything by itself).
VALID: dict[str, Any] = {
    "key": "fuzz-key", "sku": "plat.booster.xp", "price": 5, "quantity": 1, "profile": "main",
    "game": "br", "category": "weapon_skins", "cursor": None, "limit": 10, "slot": "frame",
    "before": 1, "user": "fuzz-other", "amount": 1, "reason": "fuzz", "code": "NO-SUCH-CODE",
    "name": "renamed", "users": ["fuzz-other"], "inventory": False,
    "email": "fuzz@example.com", "order": "ord_fuzz", "purchase": "pur_fuzz", "carrier": "UPS",
    "number": "1Z", "url": "https://track.example/1Z", "line1": "1 Main St", "city": "Oslo",
    "postal_code": "0150", "country": "NO", "line2": None, "region": None,
    "address": {"name": "Fuzz", "line1": "1 Main St", "city": "Oslo", "postal_code": "0150",
                "country": "NO"},
}  # fmt: skip
#: Invalid values for every field of every request.
INVALID: dict[tuple[str, str], list[Any]] = {
    (tag, field.encode_name): [v for v in _candidates(field.type) if not valid_for(field.type, v)]
    for tag, struct in REQUESTS.items()
    for field in struct.fields
}
#: Odd strings, valid wherever a string of their length without a pattern is.
ODD_STRINGS = [
    "a\x00b", "\u202eevil", "\u200f\u200e", "\ufeffbom", "e\u0301", "😀", "\u2028", "\U0010ffff",
    "\x7f", "Ω" * 64, "\\", '"', "'; DROP TABLE users; --", "%s%n", "../../etc/passwd",
]  # fmt: skip
#: Escaped in JSON, these say what UTF-8 cannot hold.
LONE_SURROGATES = ["\ud800", "a\udfffb", "\udbff\udbff"]
#: Where characters of random text come from: ASCII, controls, Latin-1,
#: the rest of the BMP but surrogates, and the astral planes.
_CHARACTERS = [(0x20, 0x7E), (0x00, 0x1F), (0x80, 0xFF), (0x100, 0xD7FF), (0xE000, 0xFFFF),
               (0x10000, 0x10FFFF)]  # fmt: skip

#: Frames written by hand: what a generator of values would not produce.
NASTY_JSON = [
    "", " ", "null", "[]", "{}", '"state"', "1e999999", "-0", "NaN", "Infinity", "[" * 60_000,
    '{"a":' * 10_000, "\ufeff" + '{"type":"state","rid":1}', '{"type":"state","rid":1}\x00',
    '{"type":"state","rid":1} {}', '{"type":"state","rid":"\\ud800"}', '{"type":"\\udfff"}',
    '{"type":"state","rid":1,"rid":{"x":1}}', '{"type":"state","type":"grant"}',
    '{"type":"state","rid":123456789012345678901234567890}', '{"type":"state","rid":1e5}',
    '{"type":"purchase","key":"k","sku":"s","price":5,"quantity":1' + "0" * 400 + "}",
    '{"type":"state","rid":"' + "\\u0000" * 60 + '"}', '{"type":"state" "rid":1}',
    '{"type":"state",}', "{'type':'state'}", '{"type":"state","rid":01}',
    '{"type":"catalog","rid":1,"cursor":"' + "%" * 200 + '"}',
    '{"type":"purchase","rid":1,"key":"a\\u0000b","sku":"plat.booster.xp","price":5}',
]  # fmt: skip
NASTY_MSGPACK = [
    b"", b"\xc1", b"\xc0", b"\x90", b"\x80", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
    b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\x91" * 60_000 + b"\xc0",
    b"\x81" * 30_000 + b"\xc0", b"\x81\x01\x02", b"\x82\xa4type\xa5state\xa3rid\xa2\xff\xfe",
    b"\x81\xa4type\xc4\x05state", b"\xd4\x01\x00", b"\xd6\xff\x00\x00\x00\x00",
    b"\xc7\x00\x05", b"\x82\xa4type\xa5state\xa3rid\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",
    b"\x81\xa4type\xa5state\x00",
    b"\x82\xa4type\xa5state\xa3rid\xcf\xff\xff\xff\xff\xff\xff\xff\xff",
]  # fmt: skip


# -------------------------------------------------------------- choosers


class Chooser(Protocol):
    """Where a frame's every choice comes from."""

    def choice(self, options: Sequence[_T]) -> _T: ...
    def integer(self, low: int, high: int) -> int: ...
    def boolean(self) -> bool: ...
    def text(self, max_size: int) -> str: ...
    def binary(self, max_size: int) -> bytes: ...
    def value(self) -> Any:
        """A JSON-like value: nested lists and objects, odd numbers, maybe big."""
        ...


JSON_VALUES: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.sampled_from(ODD_STRINGS),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=12,
)  # fmt: skip


def _big(kind: int, size: int) -> Any:
    """A big value made at once (never item by item): up to ~60 KB."""
    match kind:
        case 0:
            return "x" * size
        case 1:
            return "é" * (size // 2)
        case 2:
            return "\x00" * (size // 8)
        case 3:
            return [0] * (size // 4)
        case 4:
            return ["a"] * (size // 4)
    return {str(i): i for i in range(size // 14)}


class Drawn:
    """Choices drawn by Hypothesis."""

    def __init__(self, draw: st.DrawFn) -> None:
        self.draw = draw

    def choice(self, options: Sequence[_T]) -> _T:
        return self.draw(st.sampled_from(options))

    def integer(self, low: int, high: int) -> int:
        return self.draw(st.integers(low, high))

    def boolean(self) -> bool:
        return self.draw(st.booleans())

    def text(self, max_size: int) -> str:
        return self.draw(st.text(max_size=max_size))

    def binary(self, max_size: int) -> bytes:
        return self.draw(st.binary(max_size=max_size))

    def value(self) -> Any:
        if self.integer(0, 3) == 0:
            return _big(self.integer(0, 5), self.integer(1_000, 60_000))
        return self.draw(JSON_VALUES)


class Seeded:
    """Choices made by a ``random.Random`` (one Hypothesis seeds)."""

    _NUMBERS: Sequence[Any] = [
        0, -0.0, 1, -1, 2**31, 2**53 + 1, 2**63, 2**64, -(2**63) - 1, 10**40, 1e308, -1e-308,
        float("nan"), float("inf"), 0.1, 1.0,
    ]  # fmt: skip

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choice(self, options: Sequence[_T]) -> _T:
        return self.rng.choice(options)

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def boolean(self) -> bool:
        return self.rng.random() < 0.5

    def _length(self, max_size: int) -> int:
        """Mostly short, sometimes up to ``max_size``."""
        if self.rng.random() < 0.1:
            return self.rng.randint(0, max_size)
        return min(max_size, int(self.rng.expovariate(1 / 8)))

    def text(self, max_size: int) -> str:
        rng = self.rng
        out = []
        for _ in range(self._length(max_size)):
            low, high = _CHARACTERS[0] if rng.random() < 0.6 else rng.choice(_CHARACTERS)
            out.append(chr(rng.randint(low, high)))
        return "".join(out)

    def binary(self, max_size: int) -> bytes:
        return self.rng.randbytes(self._length(max_size))

    def value(self, depth: int = 0) -> Any:
        rng = self.rng
        roll = rng.random()
        if depth == 0 and roll < 0.1:
            return _big(rng.randint(0, 5), rng.randint(1_000, 60_000))
        if depth < 4 and roll < 0.35:
            return [self.value(depth + 1) for _ in range(rng.randint(0, 4))]
        if depth < 4 and roll < 0.55:
            return {self.text(8): self.value(depth + 1) for _ in range(rng.randint(0, 4))}
        return rng.choice(
            [None, True, False, rng.choice(self._NUMBERS), rng.randint(-(2**70), 2**70),
             rng.uniform(-1e9, 1e9), self.text(20), rng.choice(ODD_STRINGS)]
        )  # fmt: skip


# ---------------------------------------------------------------- frames


@dataclass
class Frame:
    """One frame to send, and what it was made to be."""

    payload: bytes | str
    text: bool  # a text frame (else binary)
    expect_valid: bool | None  # made to decode (True), not to (False), or either (None)


_rids = itertools.count(1000)  # apart from the small rids of the frames written by hand
DEEP = "~deep"


def _rid() -> int | str:
    n = next(_rids)
    return n if n % 2 else f"f{n}"


def size(data: bytes | str) -> int:
    return len(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)


def encode(message: dict[str, Any], binary: bool, ascii_only: bool, deep: int = 0) -> bytes | str:
    """``message`` in the codec, plus a field ``DEEP`` of ``deep`` nested
    arrays written by hand (too deep for a recursive encoder)."""
    if binary:
        if deep:
            message = {**message, DEEP: None}
        data = msgspec.msgpack.encode(message)
        if deep:
            assert data.endswith(b"\xa5~deep\xc0")
            data = data[:-1] + b"\x91" * deep + b"\xc0"
        return data
    text = json.dumps(message, ensure_ascii=ascii_only, allow_nan=True)
    if deep:
        text = f'{text[:-1]}, "{DEEP}": {"[" * deep}{"]" * deep}}}'
    return text


def _msgpack_safe(value: Any) -> Any:
    """MessagePack holds integers in [-2**63, 2**64): past them, the largest,
    which no field of ours accepts either."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if _INT64_MIN <= value <= _UINT64_MAX else _UINT64_MAX
    if isinstance(value, list):
        return [_msgpack_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _msgpack_safe(v) for k, v in value.items()}
    return value


def request_frame(ch: Chooser, binary: bool) -> Frame:
    """A request of any type with one field made invalid, or a harmless valid one;
    either with harmless extras (odd strings, unknown fields, deep nesting)."""
    harmless = ch.boolean()
    tag = ch.choice(sorted(HARMLESS) if harmless else sorted(REQUESTS))
    fields = {f.encode_name: f for f in REQUESTS[tag].fields}
    message: dict[str, Any] = {"type": tag, "rid": _rid()}
    for name, field in fields.items():
        if VALID.get(name) is not None and (field.required or ch.boolean()):
            message[name] = VALID[name]
    for _ in range(ch.integer(0, 2)):  # odd but valid strings
        name, value = ch.choice(sorted(message)), ch.choice(ODD_STRINGS)
        if name in fields and name != "rid" and valid_for(fields[name].type, value):
            message[name] = value
    extras = []
    for _ in range(ch.integer(0, 2)):  # unknown fields
        name = ch.text(12) or "x"
        if name not in message and name not in fields and name != DEEP:
            message[name] = ch.value()
            extras.append(name)
    ascii_only = binary or ch.boolean()
    if not binary and ch.integer(0, 9) == 0:
        message["lone"] = ch.choice(LONE_SURROGATES)  # JSON can only send it escaped
        extras.append("lone")
        ascii_only = True
    if not harmless:  # one change that makes it invalid
        how = ch.choice(["field", "field", "field", "missing", "type"])
        required = [name for name, field in fields.items() if field.required]
        if how == "missing" and required:
            del message[ch.choice(required)]
        elif how == "type":
            wrong = [tag.upper(), tag + "\x00", " " + tag, "", 7, None, [tag], "x" * 70]
            message["type"] = ch.choice(wrong) if ch.boolean() else ch.text(30)
            if isinstance(message["type"], str) and message["type"] in REQUESTS:
                message["type"] = tag.upper()
        else:
            name = ch.choice(sorted(fields))
            message[name] = ch.choice(INVALID[tag, name])
    if ch.boolean():  # the tag last
        message = {k: v for k, v in message.items() if k != "type"} | {"type": message["type"]}
    deep = ch.choice([0, 0, 0, 50, 500, 5_000, 30_000])
    if binary:
        message = _msgpack_safe(message)
    data = encode(message, binary, ascii_only, deep)
    if size(data) > MAX_FRAME:  # keep to what a fuzz connection may send
        data = encode({k: v for k, v in message.items() if k not in extras}, binary, ascii_only)
    return Frame(data, not binary, None if harmless else False)


def garbage_frame(ch: Chooser, binary: bool) -> Frame:
    """Anything but a request: random bytes and text, odd JSON and MessagePack."""
    choice = ch.integer(0, 5)
    if choice == 0:  # the wrong kind of frame for the subprotocol
        if binary:
            return Frame(ch.text(200), True, False)
        return Frame(msgspec.msgpack.encode({"type": "state", "rid": 1}), False, False)
    if choice == 1:
        if binary:
            return Frame(ch.binary(300), False, None)
        return Frame(ch.text(300), True, None)
    if choice == 2:
        value = ch.value()
        if binary:
            data: bytes | str = msgspec.msgpack.encode(_msgpack_safe(value))
        else:
            data = json.dumps(value, ensure_ascii=ch.boolean())
        if size(data) <= MAX_FRAME:
            return Frame(data, not binary, None)
    if binary:
        return Frame(ch.choice(NASTY_MSGPACK), False, None)
    return Frame(ch.choice(NASTY_JSON), True, None)


def frame(ch: Chooser, binary: bool) -> Frame:
    """Two request-shaped frames for one of garbage."""
    return garbage_frame(ch, binary) if ch.integer(0, 2) == 0 else request_frame(ch, binary)


@st.composite
def _drawn_frames(draw: st.DrawFn, binary: bool) -> Frame:
    return frame(Drawn(draw), binary)


def frames(binary: bool) -> st.SearchStrategy[Frame]:
    """Frames of one subprotocol, every choice a Hypothesis draw."""
    return _drawn_frames(binary)
