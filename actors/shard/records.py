"""What a shard takes and what it writes down: batch items, a change as a
journal record, an error as a reply.  Shared by the host, the residents, the
saga coordinator, the link and the gateway's batcher."""

from __future__ import annotations

import msgspec

from actors.events import Change, encode_change
from actors.user import Mutation
from persistence.journal import JournalRecord, LedgerRow
from protocol.errors import ErrorCode
from protocol.messages import Error, History, Inspect, State

#: Requests a shard serves: mutations, and reads that need the user's state.
ShardRequest = Mutation | State | Inspect | History
#: One batch item: the user it acts for and the request.
BatchItem = tuple[str, ShardRequest]

__all__ = ["MOVED", "BatchItem", "ShardRequest", "error_reply", "record_of"]

#: The reply to a request for a partition the shard does not serve (moved, or
#: being handed over): not applied, and the gateway sends it again where the
#: map now says.  No msgpack reply is empty.
MOVED = b""

_encoder = msgspec.msgpack.Encoder()


def record_of(user_id: str, change: Change) -> JournalRecord:
    """The journal record of a user's change (with its ledger row, if any)."""
    entry = change.ledger
    ledger = None
    if entry is not None:
        ledger = LedgerRow(
            entry.seq, entry.at, entry.kind, entry.amount, entry.balance,
            entry.sku, entry.quantity, entry.key,
        )  # fmt: skip
    return JournalRecord(
        user_id, change.version, change.at, change.kind, change.key, encode_change(change), ledger
    )


def error_reply(
    rid: str | int | None, code: ErrorCode, message: str, retry_after_ms: int | None = None
) -> bytes:
    """An ``error`` reply, as the shard sends replies (MessagePack)."""
    return _encoder.encode(
        Error(rid=rid, code=code.value, message=message, retry_after_ms=retry_after_ms)
    )
