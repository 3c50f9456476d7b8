"""What a resident user costs in a shard's memory (BENCHMARKS.md, "A million
users"): a shard holds up to hundreds of thousands of them.  Sizes come from
``tracemalloc`` (allocations, deterministic for a given CPython), not time."""

from __future__ import annotations

import gc
import tracemalloc

from actors.catalog import Catalog
from actors.user import LEDGER_IN_MEMORY, UserState, handle, new_user
from protocol.messages import Grant

N = 2000


def _resident_bytes(grant: bool) -> float:
    """Bytes per user of ``N`` users restored from a registered user's row
    (as a shard activates them), each with one grant applied if ``grant``."""
    first, _ = new_user("u", 1000, 1)
    snapshot = first.snapshot()
    catalog = Catalog.empty()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        users = []
        for i in range(N):
            state = UserState.restore(f"u{i:07d}", 1, 1000, snapshot)
            if grant:
                handle(state, Grant(user=state.user_id, amount=5, key="fund"), catalog, 2)
                state.mark_durable(state.version)
            users.append(state)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(users) == N
    return used / N


def test_a_resident_user_costs_little_memory() -> None:
    # With a __dict__, an OrderedDict of keys and a deque ledger tail a user
    # cost about 1,800 bytes restored and 2,450 with one change (CPython 3.11).
    assert not hasattr(UserState.restore("x", 1, 0, new_user("x", 1, 1)[0].snapshot()), "__dict__")
    assert _resident_bytes(grant=False) < 1200
    assert _resident_bytes(grant=True) < 1800


def test_the_ledger_tail_keeps_the_latest_entries() -> None:
    state, _ = new_user("u", 1, 1)
    for i in range(LEDGER_IN_MEMORY + 5):
        handle(state, Grant(user="u", amount=1, key=f"g{i}"), Catalog.empty(), 10 + i)
    assert state.ledger_complete is False
    assert len(state.ledger) == LEDGER_IN_MEMORY
    assert [e.seq for e in state.ledger] == list(range(7, LEDGER_IN_MEMORY + 7))
    assert state.ledger[-1].balance == state.balance
