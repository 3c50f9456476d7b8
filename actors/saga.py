"""The saga on an allowance, as decisions: pure code, no I/O.

A purchase of a limited item (or a promo redemption) needs a unit of a shared
allowance as well as the user's gems (see ``actors.allowance``)::

    reserve (allowance) -> apply (user) -> confirm (allowance)
                                \\-> not applied, or a replay: release

The shard that hosts the user runs it (``actors.shard.coordinator``); this
module says what to do at each turn:

* ``needs_reservation``: must this request hold a unit before it is applied?
* ``settlement``: once it was applied (or not), confirm, release, or leave the
  reservation to the sweeper?
* ``left_behind``: the sweeper's verdict on a reservation a crash left behind.

A reservation's id is the user, the key and the request's fingerprint
(``reservation_id``), so a retry of the same request finds the unit its
earlier attempt reserved, even when that attempt was lost in a crash, and
uses it instead of taking another.  The reserve answers whether it *created*
the reservation; only the attempt that created one may release it when it
turns out not to need it.  So a retry reserving after the original's
confirm (a new reservation) releases it when it finds itself a replay, and
a retry that found the original's reservation leaves it to the original: one
sale always uses one unit.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple

import msgspec
from msgspec import Struct

from actors.allowance import allowance_id
from actors.catalog import Catalog
from actors.user import UserState, redeem_check
from protocol.errors import RequestError
from protocol.messages import Purchase, Redeem

__all__ = [
    "RESERVATION_MS",
    "SETTLE_AFTER_MS",
    "STEP_TIMEOUT",
    "Answer",
    "Hold",
    "HoldState",
    "Need",
    "Result",
    "SagaStep",
    "Step",
    "journaled_step",
    "left_behind",
    "needs_reservation",
    "reservation_id",
    "settlement",
]

#: A saga step on another shard is given up after this long (seconds).
STEP_TIMEOUT = 10.0
#: A purchase must be applied this soon after its unit was reserved...
RESERVATION_MS = 10_000
#: ...and a reservation left behind is settled only this long after that:
#: longer than a journal flush may take (statement_timeout, persistence.store)
#: twice over, so a purchase applied in time is durable before it is settled.
SETTLE_AFTER_MS = 120_000


class Step(StrEnum):
    """What a saga step does to a reservation."""

    RESERVE = "reserve"
    CONFIRM = "confirm"  # the purchase happened: the units are used
    RELEASE = "release"  # it did not: the units are free again
    ABANDON = "abandon"  # the sweeper's release, recorded as the reservation's outcome


class SagaStep(Struct, array_like=True, frozen=True):
    """One step on an allowance, as sent to the shard hosting it and journaled there."""

    step: Step
    allowance: str
    reservation: str
    quantity: int
    deadline: int
    user: str
    key: str

    def then(self, step: Step) -> SagaStep:
        """The next step on the same reservation."""
        return SagaStep(
            step, self.allowance, self.reservation, self.quantity, self.deadline,
            self.user, self.key,
        )  # fmt: skip


_step_decoder = msgspec.msgpack.Decoder(SagaStep)
_untyped_step_decoder = msgspec.msgpack.Decoder(tuple[Step, str, int, int, str, str])


def journaled_step(allowance: str, data: bytes) -> SagaStep:
    """A step as its allowance's journal keeps it (``change``, in msgpack).

    Records written before steps were typed (issue 9) hold the array
    ``(step, reservation, quantity, deadline, user, key)``, without the
    allowance, whose journal it is.  Raises ``msgspec.DecodeError`` (or
    ``ValidationError``) for data that is neither."""
    try:
        return _step_decoder.decode(data)
    except msgspec.ValidationError:
        step, res, quantity, deadline, user, key = _untyped_step_decoder.decode(data)
        return SagaStep(step, allowance, res, quantity, deadline, user, key)


class HoldState(StrEnum):
    GRANTED = "granted"
    REFUSED = "refused"  # nothing left to reserve
    UNREACHABLE = "unreachable"  # the allowance's shard did not answer


class Hold(NamedTuple):
    """What a reserve step got for one request of a batch."""

    state: HoldState
    step: SagaStep
    #: This attempt made the reservation (rather than finding an earlier one).
    created: bool = False


class Answer(Struct, array_like=True, frozen=True):
    """An allowance shard's answer to one step: for a granted reserve, the
    reservation's deadline and whether this step created it; 0 refused."""

    deadline: int
    created: bool = False


class Need(NamedTuple):
    allowance: str
    quantity: int


class Result(StrEnum):
    """What became of a request that held a reservation."""

    SOLD = "sold"  # its new change used the unit (and recorded the sale)
    UNUSED = "unused"  # it was refused, not applied, or a replay: the unit is free
    UNKNOWN = "unknown"  # whether its change is durable is not known


def reservation_id(user: str, key: str, fingerprint: str) -> str:
    """One reservation per user, key and request: a retry finds its earlier
    attempt's; a different request under the same key (a conflict) never
    shares another's."""
    return f"{user}/{key}/{fingerprint}"


def needs_reservation(
    state: UserState, request: Purchase | Redeem, catalog: Catalog, now: int
) -> Need | None:
    """The allowance a new request must reserve before it is applied, if any.

    The caller has ruled out a replay (the key's record, in memory or in the
    journal, would answer it without any unit).  A request that rules which
    cannot change before it applies refuse (a wrong price, a code used or
    expired) reserves nothing.  The balance is not judged here: a grant in
    the same batch, or in another sender's batch applied meanwhile, may still
    raise it, and a unit reserved in vain is released right after the batch."""
    if isinstance(request, Redeem):
        try:
            redeem_check(state, request, catalog, now)
        except RequestError:
            return None
        return Need(allowance_id("promo", request.code), 1)
    item = catalog.items.get(request.sku)
    if item is None or item.stock is None:
        return None
    price, _ = catalog.price_at(item, now)
    if price != request.price:
        return None
    return Need(allowance_id("stock", item.sku), request.quantity)


def settlement(result: Result, created: bool) -> Step | None:
    """The step that ends a reservation once its request was applied (or not);
    None leaves it to its owner or the sweeper.  An unused reservation this
    attempt did not create belongs to an earlier attempt, which may still
    sell with it (or, if that attempt died, the sweeper settles it)."""
    if result is Result.SOLD:
        return Step.CONFIRM
    if result is Result.UNUSED and created:
        return Step.RELEASE
    return None


def left_behind(since: int, deadline: int, sold_with: list[int]) -> Step:
    """The sweeper's verdict on a reservation long past its deadline: confirm
    if a sale was recorded with it (``reservation_outcomes``: a 'sold' row of
    its id whose deadline falls within this reservation's, from ``since`` to
    ``deadline``), else abandon it.  A sale outside that span was an earlier
    reservation under the same id, confirmed already."""
    low = since or deadline  # states written before ``since`` existed
    mine = any(low <= sold <= deadline for sold in sold_with)
    return Step.CONFIRM if mine else Step.ABANDON
