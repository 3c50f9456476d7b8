"""``history`` pages: from the user's in-memory ledger tail when it covers
the page, else completed from the ledger table once the batch is durable."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from actors.user import UserState
from persistence import store
from protocol.messages import History, HistoryReply, LedgerEntry, Reply

__all__ = ["HistoryPage", "complete_history", "page_from_memory"]


@dataclass
class HistoryPage:
    """A history page waiting for older entries from the ledger table."""

    request: History
    entries: list[LedgerEntry]
    bound: int


def page_from_memory(state: UserState, request: History) -> Reply | HistoryPage:
    """A history page from the in-memory ledger tail, if it covers the page."""
    entries = [
        e for e in reversed(state.ledger) if request.before is None or e.seq < request.before
    ]
    if state.ledger_complete or len(entries) > request.limit:
        return _page(request, entries)
    # Older entries are in the ledger table: everything below the tail's
    # first entry is durable once this batch is (flushes are in order).
    bound = state.ledger[0].seq if state.ledger else (request.before or 2**63 - 1)
    if request.before is not None:
        bound = min(bound, request.before)
    return HistoryPage(request, entries, bound)


async def complete_history(pool: asyncpg.Pool, user_id: str, page: HistoryPage) -> HistoryReply:
    wanted = page.request.limit + 1 - len(page.entries)
    rows = await store.load_ledger(pool, user_id, page.bound, wanted)
    return _page(page.request, page.entries + [LedgerEntry(**dict(r)) for r in rows])


def _page(request: History, entries: list[LedgerEntry]) -> HistoryReply:
    """``entries`` newest first, possibly one more than a page (then ``next`` is set)."""
    more = len(entries) > request.limit
    entries = entries[: request.limit]
    return HistoryReply(rid=request.rid, entries=entries, next=entries[-1].seq if more else None)
