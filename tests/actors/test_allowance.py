"""Allowances (stock, promo uses): never more than the capacity, whatever
the order of reserve/confirm/release steps, retries included."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from actors.allowance import AllowanceState, confirm, left, release, reserve


def test_reserve_confirm_release() -> None:
    s = AllowanceState()
    assert reserve(s, "u1/k", 2, 3, 100, "u1", "k") == (True, True, True)
    assert left(s, 3) == 1
    assert reserve(s, "u2/k", 2, 3, 100, "u2", "k") == (False, False, False)  # sold out
    assert reserve(s, "u1/k", 2, 3, 100, "u1", "k") == (True, False, False)  # a retry
    assert reserve(s, "u1/k", 1, 3, 100, "u1", "k") == (False, False, False)  # not the same
    assert reserve(s, "u1/k", 2, 3, 200, "u1", "k") == (True, True, False)  # moves the deadline
    assert s.reservations["u1/k"].since == 100
    assert s.reservations["u1/k"].deadline == 200
    assert not release(s, "u1/k", 100)  # an older attempt cannot release the retry's
    assert confirm(s, "u1/k") and not confirm(s, "u1/k")
    assert (s.used, left(s, 3)) == (2, 1)
    assert reserve(s, "u3/k", 1, 3, 100, "u3", "k") == (True, True, True)
    assert release(s, "u3/k") and not release(s, "u3/k")
    assert left(s, 3) == 1


steps = st.lists(
    st.tuples(
        st.sampled_from(["reserve", "confirm", "release"]),
        st.integers(0, 9),  # which user
        st.integers(1, 3),  # quantity
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(1, 12), steps=steps)
def test_never_more_than_the_capacity(capacity: int, steps: list[tuple[str, int, int]]) -> None:
    s = AllowanceState()
    confirmed: set[str] = set()
    for op, user, quantity in steps:
        res = f"u{user}/k"
        if op == "reserve" and res not in confirmed:
            reserve(s, res, quantity, capacity, 1000, f"u{user}", "k")
        elif op == "confirm":
            if confirm(s, res):
                confirmed.add(res)
        else:
            release(s, res)
        reserved = sum(r.quantity for r in s.reservations.values())
        assert s.used + reserved <= capacity
        assert left(s, capacity) >= 0
        assert not confirmed & set(s.reservations)
