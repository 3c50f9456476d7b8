"""Asking a user's shard from inside the server (the fulfillment worker,
the webhooks, the operators' order commands): submit a request through the
gateway's backend and await its decoded reply."""

from __future__ import annotations

import asyncio

import msgspec

from actors.shard.records import ShardRequest
from protocol.errors import ErrorCode, RequestError
from protocol.messages import Error, ServerMessageUnion
from server.batching import Backend, ShardBusy

__all__ = ["ask"]

_replies = msgspec.msgpack.Decoder(ServerMessageUnion)


_TIMEOUT = 30.0


async def ask(backend: Backend, user: str, request: ShardRequest) -> object:
    """The shard's reply to ``request`` for ``user``; an ``error`` reply is
    raised as ``RequestError`` (``unavailable`` when the shard is busy or
    does not answer in 30 seconds: the outcome is then unknown, and
    the same key asks again)."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[bytes] = loop.create_future()

    def reply(data: bytes) -> None:
        if not answer.done():
            answer.set_result(data)

    try:
        backend.submit(user, request, reply)
    except ShardBusy:
        raise RequestError(ErrorCode.UNAVAILABLE, "the server is overloaded; retry") from None
    try:
        data = await asyncio.wait_for(answer, _TIMEOUT)
    except TimeoutError:
        raise RequestError(ErrorCode.UNAVAILABLE, "no answer from the shard; retry") from None
    message = _replies.decode(data)
    if isinstance(message, Error):
        raise RequestError(ErrorCode(message.code), message.message, message.retry_after_ms)
    return message
