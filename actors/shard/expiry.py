"""Time-limited items leave at their time, without waiting for a request
(PROTOCOL.md §10): a heap of (when, user) for the shard's users, resident or
not, and a task that wakes at the next one and has the host expire them."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Awaitable, Callable

import asyncpg

from actors.user import UserState, next_expiry
from persistence import store

__all__ = ["ExpiryScheduler"]

log = logging.getLogger("loadout.shard")

#: How far ahead the database is read for due expiries, and how often.
_HORIZON_MS = 86_400_000
_RELOAD_SECONDS = 3600.0
_RETRY_MS = 1000


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class ExpiryScheduler:
    """When each user's next time-limited item is due; stale entries are harmless."""

    def __init__(
        self, serves: Callable[[str], bool], expire: Callable[[set[str]], Awaitable[None]]
    ) -> None:
        self._serves = serves
        self._expire = expire
        self._heap: list[tuple[int, str]] = []
        self._next_due: dict[str, int] = {}
        self._wake = asyncio.Event()

    def schedule(self, user_id: str, state: UserState) -> None:
        """Remember when the user's next item expires; one heap entry per time."""
        when = next_expiry(state)
        if when is not None and self._next_due.get(user_id) != when:
            self._push(user_id, when)

    def _push(self, user_id: str, when: int) -> None:
        self._next_due[user_id] = when
        heapq.heappush(self._heap, (when, user_id))
        self._wake.set()

    async def load_once(self, pool: asyncpg.Pool) -> None:
        """Schedule the expiries of the users this shard serves due within the
        next day, resident or not (so a restart or a move loses none)."""
        for user_id, when in await store.load_due_expiries(pool, _now_ms() + _HORIZON_MS):
            if ":" in user_id or not self._serves(user_id):
                continue
            if self._next_due.get(user_id, when + 1) > when:
                self._push(user_id, when)

    async def load_due(self, pool: asyncpg.Pool) -> None:
        """``load_once`` now, then again every hour."""
        while True:
            try:
                await self.load_once(pool)
            except Exception as exc:
                log.warning("could not load due expiries: %r; retrying", exc)
                await asyncio.sleep(10)
                continue
            await asyncio.sleep(_RELOAD_SECONDS)

    async def run(self) -> None:
        """Expire what is due, as it comes due; retry a second later on failure."""
        while True:
            self._wake.clear()
            now = _now_ms()
            due: set[str] = set()
            while self._heap and self._heap[0][0] <= now:
                when, user_id = heapq.heappop(self._heap)
                if self._next_due.get(user_id) == when:
                    del self._next_due[user_id]
                    due.add(user_id)
            if due:
                try:
                    await self._expire(due)
                except Exception as exc:  # retried: the items are still due
                    log.warning("expiry of %d users failed: %r; retrying", len(due), exc)
                    for user_id in due:
                        self._push(user_id, now + _RETRY_MS)
                continue
            wait = (self._heap[0][0] - now) / 1000 if self._heap else 60.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(wait, 60.0))
