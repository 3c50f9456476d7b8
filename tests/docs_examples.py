"""The JSON examples of docs/protocol.md, as the tests that keep the page
honest read them: every line of every ```json block is one message, a
client's request or a server's message, whichever the real codec decodes it
as without losing or changing a field."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import msgspec

from protocol.messages import ClientMessage, ServerMessageUnion

__all__ = ["PROTOCOL_DOC", "Direction", "Example", "examples", "first"]

PROTOCOL_DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
_BLOCK = re.compile(r"^```json\n(.*?)^```", re.MULTILINE | re.DOTALL)
_DECODERS = {
    "client": msgspec.json.Decoder(ClientMessage),
    "server": msgspec.json.Decoder(ServerMessageUnion),
}


class Direction(StrEnum):
    CLIENT = "client"
    SERVER = "server"


@dataclass(frozen=True)
class Example:
    line: int
    text: str
    message: dict[str, Any]
    direction: Direction


def _kept(example: dict[str, Any], decoded: object) -> bool:
    """Did decoding keep every field of the example as it is (msgspec ignores
    unknown fields: a misspelt one would otherwise pass)?"""
    again = msgspec.to_builtins(decoded)
    return all(key in again and again[key] == value for key, value in example.items())


def direction_of(text: str) -> Direction:
    """The direction the real codec decodes ``text`` in; ValueError if none."""
    for direction in Direction:
        try:
            decoded = _DECODERS[direction].decode(text)
        except msgspec.ValidationError:
            continue
        if _kept(msgspec.json.decode(text), decoded):
            return direction
    raise ValueError(f"not a message of either direction: {text}")


def examples(path: Path = PROTOCOL_DOC) -> list[Example]:
    """Every example of the page, in order (ValueError for a bad one)."""
    source = path.read_text(encoding="utf-8")
    found = []
    for block in _BLOCK.finditer(source):
        first_line = source.count("\n", 0, block.start(1)) + 1
        for offset, text in enumerate(block[1].splitlines()):
            if not text.strip():
                continue
            line = first_line + offset
            try:
                found.append(Example(line, text, msgspec.json.decode(text), direction_of(text)))
            except (msgspec.DecodeError, ValueError) as exc:
                raise ValueError(f"{path.name}:{line}: {exc}") from None
    return found


def first(kind: str, direction: Direction) -> dict[str, Any]:
    """A copy of the page's first example of this type and direction."""
    for example in examples():
        if example.message["type"] == kind and example.direction is direction:
            return dict(example.message)
    raise LookupError(f"docs/protocol.md shows no {direction} {kind!r}")
