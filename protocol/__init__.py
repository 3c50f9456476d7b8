"""The Loadout wire contract: message types, error codes and codecs.

Imports nothing of ours, so game clients, match servers and tests can use it
on its own.
"""

from protocol.codec import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL, Codec, codec_for
from protocol.errors import ErrorCode, RequestError
from protocol.messages import PROTOCOL_VERSION, ClientMessage, ServerMessage

__all__ = [
    "JSON_SUBPROTOCOL",
    "MSGPACK_SUBPROTOCOL",
    "PROTOCOL_VERSION",
    "ClientMessage",
    "Codec",
    "ErrorCode",
    "RequestError",
    "ServerMessage",
    "codec_for",
]
