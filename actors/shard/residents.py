"""The entities a shard holds in memory: activation, passivation, key lookups.

Users (``actors.user``) and allowances (``actors.allowance``) are activated
from their state rows on first use, in one query per batch, and passivated
when idle.  Two rules keep exactly-once true whatever the history (DESIGN.md):

* **Holds.** From the moment a batch starts (before its first ``await``)
  until it has applied, its users are *held*: not passivated, and no
  idempotency record of theirs leaves memory.  So a key looked up in the
  journal before an ``await``, or applied by another batch during it, is
  still found when the batch applies.
* **Forgetting.** A user whose in-memory state cannot be trusted (a flush
  failed or rejected it, or a bug raised mid-change) is forgotten: its
  buffered journal records are dropped first, and activating it again waits
  until nothing of it is in flight, then reads what is durable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import asyncpg
import msgspec

from actors.allowance import AllowanceState
from actors.events import decode_change
from actors.shard.records import record_of
from actors.user import KeyRecord, UserState, new_user, next_expiry
from persistence import store
from persistence.journal import Journal, JournalRecord, UserRow

__all__ = [
    "HostedAllowance",
    "Residents",
    "allowance_decoder",
    "allowance_encoder",
    "is_allowance",
]

log = logging.getLogger("loadout.shard")

#: Hears of each user ``Residents.activate`` read (or created): id and state.
_Loaded = Callable[[str, UserState], None]

allowance_encoder = msgspec.msgpack.Encoder()
allowance_decoder = msgspec.msgpack.Decoder(AllowanceState)


@dataclass
class HostedAllowance:
    version: int
    state: AllowanceState


def is_allowance(entity: str) -> bool:
    """Allowance ids are ``kind:name``; user ids have no ':'."""
    return ":" in entity


class Residents:
    """Users and allowances in memory, and the rules for loading and dropping them."""

    def __init__(self, starting_balance: int, idle_seconds: float, max_users: int) -> None:
        self._starting_balance = starting_balance
        self._idle_seconds = idle_seconds
        self._max_users = max_users
        self.users: OrderedDict[str, UserState] = OrderedDict()
        self.allowances: dict[str, HostedAllowance] = {}
        self._loading: dict[str, asyncio.Future[None]] = {}
        self._last_used: dict[str, float] = {}
        self._holds: Counter[str] = Counter()
        self._pool: asyncpg.Pool | None = None
        self._journal: Journal | None = None
        self.activations = 0
        self.passivations = 0

    def attach(self, pool: asyncpg.Pool, journal: Journal) -> None:
        self._pool, self._journal = pool, journal

    # ----------------------------------------------------------------- holds

    def hold(self, users: Iterable[str]) -> None:
        self._holds.update(users)

    def release(self, users: Iterable[str]) -> None:
        """The batch holding these users has applied: a user no batch holds
        any more may let its oldest durable key records go."""
        self._holds.subtract(users)
        for user in users:
            if self._holds[user] <= 0:
                del self._holds[user]
                state = self.users.get(user)
                if state is not None:
                    state.trim_keys()

    def held(self, user: str) -> bool:
        return user in self._holds

    def touch(self, user: str) -> UserState | None:
        """The resident user, marked as just used."""
        state = self.users.get(user)
        if state is not None:
            self.users.move_to_end(user)
            self._last_used[user] = time.monotonic()
        return state

    # ------------------------------------------------------------ activation

    async def activate(self, ids: set[str], on_loaded: _Loaded) -> None:
        """Make every entity resident; load the missing ones in one query.

        ``on_loaded`` hears of each user read from the database (the expiry
        scheduler).  A forgotten entity whose records are still in flight is
        loaded only once they have settled, so it reads what is durable."""
        missing = [u for u in ids if u not in self.users and u not in self.allowances]
        if not missing:
            return
        assert self._pool is not None and self._journal is not None
        mine = [u for u in missing if u not in self._loading]
        others = {self._loading[u] for u in missing if u in self._loading}
        if mine:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            for u in mine:
                self._loading[u] = done
            try:
                await self._journal.settled(mine)
                stored = await store.load_users(self._pool, mine)
                records = self._install(mine, stored, on_loaded)
                # A new user's starting credit is journaled with the first batch.
                if records:
                    self._journal.write(records).add_done_callback(_ignore_outcome)
            finally:
                for u in mine:
                    del self._loading[u]
                done.set_result(None)
        for future in others:
            await future

    def _install(
        self, ids: list[str], stored: dict[str, store.StoredUser], on_loaded: _Loaded
    ) -> list[JournalRecord]:
        records: list[JournalRecord] = []
        now_ms = time.time_ns() // 1_000_000
        seen = time.monotonic()
        for u in ids:
            row = stored.get(u)
            if is_allowance(u):
                self.allowances[u] = (
                    HostedAllowance(row.version, allowance_decoder.decode(row.state))
                    if row is not None
                    else HostedAllowance(0, AllowanceState())
                )
                continue
            if row is not None:
                state = UserState.restore(u, row.version, row.balance, row.state)
            else:
                state, change = new_user(u, self._starting_balance, now_ms)
                if change is not None:
                    records.append(record_of(u, change))
            self.users[u] = state
            self._last_used[u] = seen
            on_loaded(u, state)
        self.activations += len(ids)
        return records

    async def lookup_keys(self, wanted: list[tuple[str, str]]) -> dict[tuple[str, str], KeyRecord]:
        """Idempotency records of these (user, scoped key) pairs that are not in
        memory, from the journal's index.  The users must be held."""
        missing = []
        for user, key in wanted:
            state = self.users.get(user)
            if state is not None and not state.keys_complete and key not in state.keys:
                missing.append((user, key))
        return await self.read_keys(missing)

    async def read_keys(self, wanted: list[tuple[str, str]]) -> dict[tuple[str, str], KeyRecord]:
        """Idempotency records of these (user, scoped key) pairs in the journal."""
        if not wanted:
            return {}
        assert self._pool is not None
        found: dict[tuple[str, str], KeyRecord] = {}
        for pair, data in (await store.load_changes_by_key(self._pool, wanted)).items():
            change = decode_change(data)
            if change.fingerprint and change.reply is not None:
                found[pair] = KeyRecord(change.fingerprint, change.reply, change.version)
        return found

    # ----------------------------------------------------- durability, doubt

    def durable(self, versions: dict[str, int]) -> None:
        """These users' changes up to these versions are durable: records of
        their keys may now leave memory (unless a batch holds the user)."""
        for user, version in versions.items():
            state = self.users.get(user)
            if state is None:
                continue
            state.mark_durable(version)
            if user not in self._holds:
                state.trim_keys()

    def forget(self, ids: Iterable[str]) -> None:
        """Drop these entities from memory; they reload from what is durable.
        The caller has made sure none has records buffered (``Journal.purge``)."""
        dropped = 0
        for u in ids:
            dropped += (self.users.pop(u, None) or self.allowances.pop(u, None)) is not None
            self._last_used.pop(u, None)
        if dropped:
            log.warning("forgot %d entities; they reload from the database", dropped)

    def snapshot(self, entity: str) -> UserRow:
        """The state row of an entity as it is now (the journal's cut)."""
        held = self.allowances.get(entity)
        if held is not None:
            return UserRow(held.version, 0, allowance_encoder.encode(held.state))
        state = self.users[entity]
        return UserRow(state.version, state.balance, state.snapshot(), next_expiry(state))

    # ----------------------------------------------------------- passivation

    def passivate(self, now: float) -> int:
        """Drop users idle for ``idle_seconds`` (or the least recently used
        beyond ``max_users``), except those held or with changes not yet durable."""
        assert self._journal is not None
        cutoff = now - self._idle_seconds
        dropped = 0
        for user_id in list(self.users):  # least recently used first
            over = len(self.users) > self._max_users
            if not over and self._last_used.get(user_id, now) > cutoff:
                break
            if self._journal.is_pending(user_id) or user_id in self._holds:
                continue
            del self.users[user_id]
            self._last_used.pop(user_id, None)
            dropped += 1
        self.passivations += dropped
        if dropped:
            log.info("passivated %d idle users; %d resident", dropped, len(self.users))
        return dropped


def _ignore_outcome(future: asyncio.Future[frozenset[str]]) -> None:
    """A starting credit's write: its batch's own write reports the outcome."""
    if not future.cancelled():
        future.exception()
