"""Allowances: shared counts that must never be oversold (DESIGN.md).

The stock of a limited item and the uses of a promo code are the same kind
of entity: a capacity, what has been used of it, and reservations held for
purchases (or redemptions) in progress.  Like a user, an allowance lives in
exactly one shard (by the hash of its id) and changes one request at a time,
in pure code; the shard journals every change before it answers.

A purchase of a limited item is a small saga between two entities::

    reserve (allowance) -> debit and grant (user) -> confirm (allowance)
                                 \\-> on refusal: release (allowance)

Every step is idempotent by reservation id (one per user, key and request:
see ``actors.saga``, which holds the saga's decisions).  A reservation carries a
deadline: the user's shard applies the purchase only before it, and the
allowance's sweeper settles a reservation left behind by a crash only well
after it, by looking for its sale in ``reservation_outcomes`` (confirm if
there, release if not).
"""

from __future__ import annotations

from msgspec import Struct

__all__ = [
    "AllowanceState",
    "Reservation",
    "allowance_id",
    "left",
]


class Reservation(Struct, array_like=True):
    quantity: int
    deadline: int
    user: str
    key: str
    #: Unused (the fingerprint is in the reservation id); kept so that states
    #: written before still decode (the struct is positional).
    fingerprint: str = ""
    #: The deadline this reservation was made with (``deadline`` moves later
    #: when a retry reserves again): a sale recorded with a deadline from
    #: ``since`` to ``deadline`` is this reservation's.  0 in older states.
    since: int = 0


class AllowanceState(Struct, array_like=True):
    used: int = 0
    reservations: dict[str, Reservation] = {}


def allowance_id(kind: str, name: str) -> str:
    """``stock:<sku>`` or ``promo:<code>``: never a user id (those have no ':')."""
    return f"{kind}:{name}"


def left(state: AllowanceState, capacity: int) -> int:
    """What can still be reserved."""
    return capacity - state.used - sum(r.quantity for r in state.reservations.values())


def reserve(
    state: AllowanceState,
    res: str,
    quantity: int,
    capacity: int,
    deadline: int,
    user: str,
    key: str,
) -> tuple[bool, bool, bool]:
    """Reserve ``quantity``; return (granted, changed, created).  Reserving
    again under the same id (a retry of the same request) keeps the
    reservation, moves its deadline later, and did not create it."""
    held = state.reservations.get(res)
    if held is not None:
        if held.quantity != quantity:
            return False, False, False
        if held.deadline >= deadline:
            return True, False, False
        held.deadline = deadline
        return True, True, False
    if left(state, capacity) < quantity:
        return False, False, False
    state.reservations[res] = Reservation(quantity, deadline, user, key, since=deadline)
    return True, True, True


def confirm(state: AllowanceState, res: str) -> bool:
    """The purchase happened: the reservation becomes used.  True if changed."""
    held = state.reservations.pop(res, None)
    if held is None:
        return False
    state.used += held.quantity
    return True


def release(state: AllowanceState, res: str, deadline: int | None = None) -> bool:
    """The purchase did not happen: the units are free again.  True if changed.

    With ``deadline``, only the reservation as it was then is released: if a
    retry has reserved again since (a later deadline), the retry owns it."""
    held = state.reservations.get(res)
    if held is None or (deadline is not None and held.deadline != deadline):
        return False
    del state.reservations[res]
    return True
