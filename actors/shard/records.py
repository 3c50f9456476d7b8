"""What a shard takes and what it writes down: batch items, a change as a
journal record, an error as a reply.  Shared by the host, the residents, the
saga coordinator, the link and the gateway's batcher."""

from __future__ import annotations

import msgspec

from actors.events import Change, OrderMoved, OrderOpened, encode_change
from actors.user import Mutation
from persistence.journal import JournalRecord, LedgerRow, OrderWrite
from protocol.errors import ErrorCode
from protocol.messages import Error, History, Inspect, State
from protocol.money import Orders

#: Requests a shard serves: mutations, and reads that need the user's state.
ShardRequest = Mutation | State | Inspect | History | Orders
#: One batch item: the user it acts for and the request.
BatchItem = tuple[str, ShardRequest]

__all__ = ["MOVED", "BatchItem", "ShardRequest", "error_reply", "record_of"]

#: The reply to a request for a partition the shard does not serve (moved, or
#: being handed over): not applied, and the gateway sends it again where the
#: map now says.  No msgpack reply is empty.
MOVED = b""

_encoder = msgspec.msgpack.Encoder()
_json = msgspec.json.Encoder()


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
        user_id, change.version, change.at, change.kind, change.key, encode_change(change),
        ledger, None, _order_writes(change),
    )  # fmt: skip


def _order_writes(change: Change) -> tuple[OrderWrite, ...]:
    writes: list[OrderWrite] = []
    for event in change.events:
        match event:
            case OrderOpened():
                address = None if event.address is None else _json.encode(event.address).decode()
                opened = (event.purchase, event.sku, event.delivery, event.quantity,
                          event.total, event.email, address)  # fmt: skip
                writes.append(OrderWrite(event.order, change.at, "pending", opened))
            case OrderMoved():
                tracking = None if event.tracking is None else _json.encode(event.tracking)
                writes.append(
                    OrderWrite(
                        event.order,
                        change.at,
                        event.status.value,
                        None,
                        event.voucher,
                        None if tracking is None else tracking.decode(),
                        event.shop_order,
                    )
                )
    return tuple(writes)


def error_reply(
    rid: str | int | None, code: ErrorCode, message: str, retry_after_ms: int | None = None
) -> bytes:
    """An ``error`` reply, as the shard sends replies (MessagePack)."""
    return _encoder.encode(
        Error(rid=rid, code=code.value, message=message, retry_after_ms=retry_after_ms)
    )
