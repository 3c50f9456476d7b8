"""Codecs for the two subprotocols: JSON in text frames, MessagePack in binary.

One ``Codec`` per subprotocol, built once and shared by every connection: the
msgspec encoders and decoders inside are reused, never built per message.
Decoding failures become ``bad_request`` here, once; when the frame was an
object with a usable ``rid``, the error echoes it.
"""

from __future__ import annotations

from typing import Any

import msgspec

from protocol.errors import ErrorCode, RequestError
from protocol.messages import ClientMessage, Error, ServerMessage, ServerMessageUnion

__all__ = ["JSON_SUBPROTOCOL", "MSGPACK_SUBPROTOCOL", "Codec", "codec_for"]

JSON_SUBPROTOCOL = "loadout.v1.json"
MSGPACK_SUBPROTOCOL = "loadout.v1.msgpack"


class _Envelope(msgspec.Struct):
    """Just enough of a request to echo its ``rid`` when the rest is bad."""

    rid: Any = None


def _usable_rid(rid: Any) -> str | int | None:
    if isinstance(rid, bool):
        return None
    if (isinstance(rid, int) and -(2**63) <= rid < 2**63) or (
        isinstance(rid, str) and len(rid) <= 64
    ):
        return rid
    return None


class Codec:
    """Encodes server messages and decodes client messages for one subprotocol."""

    def __init__(self, subprotocol: str) -> None:
        self.subprotocol = subprotocol
        self.binary = subprotocol == MSGPACK_SUBPROTOCOL
        # msgspec's JSON and MessagePack decoders share one interface but no
        # common type, and the JSON one also takes str: typed loosely here.
        self._request: Any
        self._envelope: Any
        self._any: Any
        self._server: Any
        if self.binary:
            self._encoder: msgspec.json.Encoder | msgspec.msgpack.Encoder = (
                msgspec.msgpack.Encoder()
            )
            self._request = msgspec.msgpack.Decoder(ClientMessage)
            self._envelope = msgspec.msgpack.Decoder(_Envelope)
            self._any = msgspec.msgpack.Decoder()
            self._server = msgspec.msgpack.Decoder(ServerMessageUnion)
        else:
            self._encoder = msgspec.json.Encoder()
            self._request = msgspec.json.Decoder(ClientMessage)
            self._envelope = msgspec.json.Decoder(_Envelope)
            self._any = msgspec.json.Decoder()
            self._server = msgspec.json.Decoder(ServerMessageUnion)

    def decode_request(self, frame: bytes | str) -> ClientMessage:
        """Decode one client frame; raise ``RequestError(bad_request)`` with the
        rid recovered where possible (see ``rid_of``)."""
        if isinstance(frame, str) == self.binary:
            kind = "text" if self.binary else "binary"
            raise RequestError(
                ErrorCode.BAD_REQUEST, f"{kind} frames are not used by {self.subprotocol}"
            )
        try:
            request: ClientMessage = self._request.decode(frame)
            return request
        except msgspec.ValidationError as exc:
            raise RequestError(ErrorCode.BAD_REQUEST, str(exc)) from None
        except (msgspec.DecodeError, RecursionError):
            raise RequestError(ErrorCode.BAD_REQUEST, "frame is not a valid message") from None

    def rid_of(self, frame: bytes | str) -> str | int | None:
        """The ``rid`` of a frame that failed to decode as a request, if any."""
        if self.binary and isinstance(frame, str):  # the msgpack decoder takes bytes only
            return None
        try:
            envelope: _Envelope = self._envelope.decode(frame)
            return _usable_rid(envelope.rid)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            return None

    def encode(self, message: ServerMessage) -> bytes:
        return self._encoder.encode(message)

    def encode_error(self, rid: str | int | None, error: RequestError) -> bytes:
        return self._encoder.encode(
            Error(
                rid=rid,
                code=error.code.value,
                message=error.message,
                retry_after_ms=error.retry_after_ms,
            )
        )

    def decode_server(self, frame: bytes | str) -> ServerMessageUnion:
        """Decode a server message (used by clients, the bench and tests)."""
        message: ServerMessageUnion = self._server.decode(frame)
        return message

    def encode_any(self, value: Any) -> bytes:
        return self._encoder.encode(value)

    def decode_any(self, frame: bytes | str) -> Any:
        return self._any.decode(frame)


_CODECS = {name: Codec(name) for name in (JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL)}


def codec_for(subprotocol: str | None) -> Codec:
    """The shared codec of a subprotocol; JSON when the client offered none."""
    return _CODECS.get(subprotocol or JSON_SUBPROTOCOL, _CODECS[JSON_SUBPROTOCOL])
