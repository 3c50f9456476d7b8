"""The JSON Schema of both message directions, generated from the types.

``python -m protocol.schema > docs/protocol.schema.json`` regenerates the
committed schema; a test fails when the two differ, so client authors in
other languages can generate their types from a file that is always current.
The MessagePack subprotocol carries the same objects.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import msgspec

from protocol.messages import PROTOCOL_VERSION, ClientMessage, ServerMessageUnion

__all__ = ["protocol_schema", "render"]


def protocol_schema() -> dict[str, Any]:
    """One schema document: ``$defs`` holds every type, ``ClientMessage``
    (what a client sends) and ``ServerMessage`` (what it receives) among them."""
    (client, server), components = msgspec.json.schema_components(
        (ClientMessage, ServerMessageUnion), ref_template="#/$defs/{name}"
    )
    defs = dict(sorted(components.items()))
    defs["ClientMessage"] = {"title": "ClientMessage", **client}
    defs["ServerMessage"] = {"title": "ServerMessage", **server}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"Loadout protocol version {PROTOCOL_VERSION}",
        "description": (
            "Messages of the Loadout WebSocket protocol (docs/protocol.md). A client sends"
            " ClientMessage and receives ServerMessage; the field `type` tells the kind."
            " Generated from protocol/messages.py by `python -m protocol.schema`."
        ),
        "anyOf": [{"$ref": "#/$defs/ClientMessage"}, {"$ref": "#/$defs/ServerMessage"}],
        "$defs": defs,
    }


def render() -> str:
    """The schema as the committed file holds it."""
    return json.dumps(protocol_schema(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
