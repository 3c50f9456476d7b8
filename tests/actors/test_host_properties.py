"""A hypothesis state machine drives one shard host (against the real
PostgreSQL and Redis) with random batches: duplicate and old keys, limited
items and promo codes, two senders at once, passivation, restarts, and flush
failures (failed outright, or committed but reported failed).  After every
step it checks, from the database: every acknowledged key replays to its
original reply and is journaled once; the ledger sums to the balance;
replaying the journal gives the state rows; stock used + reserved never
exceeds the capacity."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from actors.allowance import AllowanceState, allowance_id
from actors.events import decode_change
from actors.shard.host import ShardHost, ShardSettings
from actors.shard.records import BatchItem, ShardRequest
from actors.user import UserState, evolve, new_user, scoped_key
from persistence.journal import JournalError
from persistence.store import open_pool
from protocol.messages import Grant, Purchase, Redeem, State
from tests.actors.conftest import fresh_shard

USERS = ["pa", "pb", "pc"]
KEYS = [f"k{i}" for i in range(6)]
FOUNDERS, STOCK = "br.rifle.founders", 500
BOOSTER = "plat.booster.xp"
CODE = "WELCOME-2026"
_decoder = msgspec.msgpack.Decoder()

requests = st.one_of(
    st.builds(
        lambda k, a: Grant(user="", key=k, amount=a), st.sampled_from(KEYS), st.integers(1, 900)
    ),
    st.builds(
        lambda k, q: Purchase(key=k, sku=BOOSTER, price=5, quantity=q),
        st.sampled_from(KEYS),
        st.integers(1, 3),
    ),
    st.builds(lambda k: Purchase(key=k, sku=FOUNDERS, price=1000), st.sampled_from(KEYS)),
    st.builds(lambda k: Redeem(key=k, code=CODE), st.sampled_from(KEYS)),
    st.just(State()),
)
items = st.tuples(st.sampled_from(USERS), requests)
batches = st.lists(items, min_size=1, max_size=8)


def _for(user: str, request: ShardRequest) -> ShardRequest:
    return msgspec.structs.replace(request, user=user) if isinstance(request, Grant) else request


@dataclass
class Original:
    request: ShardRequest
    reply: dict[str, Any]


Originals = dict[tuple[str, str], Original]


def _checked(
    originals: Originals, batch: list[BatchItem], replies: list[bytes], failing: bool
) -> Originals:
    """Check a batch's replies against the keys acknowledged so far; the keys
    acknowledged after it.  Only a failed flush may answer ``unavailable``."""
    originals = dict(originals)
    for (user, request), data in zip(batch, replies, strict=True):
        reply = _decoder.decode(data)
        assert reply["rid"] == request.rid
        code = reply.get("code")
        assert code != "internal", reply
        if code == "unavailable":
            assert failing, reply
            continue
        key = None if isinstance(request, State) else scoped_key(request)  # type: ignore[arg-type]
        if key is None:
            continue
        seen = originals.get((user, key))
        plain = {k: v for k, v in reply.items() if k != "rid"}
        if seen is not None:
            if seen.request == msgspec.structs.replace(request, rid=None):
                assert plain == seen.reply, (request, reply, seen)
            else:
                assert code == "idempotency_conflict", (request, reply, seen)
        elif code is None:
            originals[(user, key)] = Original(msgspec.structs.replace(request, rid=None), plain)
    return originals


class HostMachine(RuleBasedStateMachine):
    dsn = ""
    redis = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.shard = fresh_shard()
        self.prefix = f"m{self.shard}-"
        self.pool: asyncpg.Pool = self.run(open_pool(self.dsn))
        self.host = self.run(self._start())
        self.originals: Originals = {}
        self.rid = 0

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    async def _start(self) -> ShardHost:
        host = ShardHost(
            ShardSettings(
                shard=self.shard,
                database_url=self.dsn,
                redis_url=self.redis,
                starting_balance=100,
            )
        )
        await host.start()
        return host

    def teardown(self) -> None:
        try:
            self.run(self.host.close())
            self.run(self.pool.close())
        finally:
            self.loop.close()

    # ----------------------------------------------------------------- sending

    def _batch(self, drawn: list[tuple[str, ShardRequest]]) -> list[BatchItem]:
        batch: list[BatchItem] = []
        for user, request in drawn:
            self.rid += 1
            user = self.prefix + user
            batch.append((user, msgspec.structs.replace(_for(user, request), rid=self.rid)))
        return batch

    def _check(self, batch: list[BatchItem], replies: list[bytes], failing: bool) -> None:
        self.originals = _checked(self.originals, batch, replies, failing)

    async def _send(self, batch: list[BatchItem]) -> list[bytes]:
        return await self.host.apply_batch(self.host.catalog.version, batch)

    async def _both(self, a: list[BatchItem], b: list[BatchItem]) -> list[list[bytes]]:
        return list(await asyncio.gather(self._send(a), self._send(b)))

    @rule(drawn=batches)
    def one_batch(self, drawn: list[tuple[str, ShardRequest]]) -> None:
        batch = self._batch(drawn)
        self._check(batch, self.run(self._send(batch)), failing=False)

    @rule(first=batches, second=batches)
    def two_senders(
        self, first: list[tuple[str, ShardRequest]], second: list[tuple[str, ShardRequest]]
    ) -> None:
        a, b = self._batch(first), self._batch(second)
        ra, rb = self.run(self._both(a, b))
        # Each batch applies whole, but which went first is not known.
        try:
            after = _checked(_checked(self.originals, a, ra, False), b, rb, False)
        except AssertionError:
            after = _checked(_checked(self.originals, b, rb, False), a, ra, False)
        self.originals = after

    @rule(picks=st.lists(st.integers(0, 10**6), min_size=1, max_size=6))
    def resend_old_keys(self, picks: list[int]) -> None:
        # Which keys were acknowledged depends on how batches interleaved, so
        # the draw is of indexes, not of keys: Hypothesis' draws must not
        # depend on what the server did.
        known = sorted(self.originals)
        if not known:
            return
        batch: list[BatchItem] = []
        for pick in picks:
            user, key = known[pick % len(known)]
            self.rid += 1
            original = self.originals[(user, key)].request
            batch.append((user, msgspec.structs.replace(original, rid=self.rid)))
        self._check(batch, self.run(self._send(batch)), failing=False)

    @rule(drawn=batches, committed=st.booleans())
    def flush_fails(self, drawn: list[tuple[str, ShardRequest]], committed: bool) -> None:
        """The next flush fails: outright, or after committing (outcome unknown)."""
        journal = self.host._journal
        assert journal is not None
        real = journal._flush

        async def failing(*args: Any) -> set[str]:
            journal._flush = real  # type: ignore[method-assign]
            if committed:
                await real(*args)
            raise JournalError("injected")

        journal._flush = failing  # type: ignore[method-assign]
        batch = self._batch(drawn)
        try:
            replies = self.run(self._send(batch))
        finally:
            journal._flush = real  # type: ignore[method-assign]
        self._check(batch, replies, failing=True)

    @rule(user=st.sampled_from(USERS))
    def passivate(self, user: str) -> None:
        self.host.residents.forget({self.prefix + user})

    @rule()
    def restart(self) -> None:
        self.run(self.host.close())
        self.host = self.run(self._start())

    # --------------------------------------------------------------- checking

    @invariant()
    def database_is_consistent(self) -> None:
        self.run(self._consistent())

    async def _consistent(self) -> None:
        if self.host._journal is not None:
            await self.host._journal.drain()
        users = [self.prefix + u for u in USERS]
        rows = {
            r["user_id"]: r
            for r in await self.pool.fetch(
                "SELECT user_id, version, balance, state FROM users WHERE user_id = ANY($1)", users
            )
        }
        for user in users:
            changes = await self.pool.fetch(
                "SELECT version, change FROM journal WHERE user_id = $1 ORDER BY version", user
            )
            ledger = await self.pool.fetchval(
                "SELECT coalesce(sum(amount), 0) FROM ledger WHERE user_id = $1", user
            )
            row = rows.get(user)
            if row is None:
                assert not changes
                continue
            assert ledger == row["balance"]
            replayed, _ = new_user(user, 0, 0)
            for record in changes:
                evolve(replayed, decode_change(record["change"]))
            stored = UserState.restore(user, row["version"], row["balance"], row["state"])
            assert (replayed.version, replayed.balance) == (row["version"], row["balance"])
            assert replayed.view() == stored.view()
        keys = await self.pool.fetch(
            "SELECT user_id, key, count(*) AS n FROM journal WHERE user_id = ANY($1)"
            " AND key IS NOT NULL GROUP BY 1, 2",
            users,
        )
        counts = {(r["user_id"], r["key"]): r["n"] for r in keys}
        for pair in self.originals:
            assert counts.get(pair) == 1, pair
        stock = await self.pool.fetchrow(
            "SELECT state FROM users WHERE user_id = $1", allowance_id("stock", FOUNDERS)
        )
        if stock is not None:
            held = msgspec.msgpack.decode(stock["state"], type=AllowanceState)
            assert held.used + sum(r.quantity for r in held.reservations.values()) <= STOCK


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_the_shard_host_keeps_exactly_once(
    db: asyncpg.Pool, pg_dsn: str, session_redis: str
) -> None:
    HostMachine.dsn, HostMachine.redis = pg_dsn, session_redis
    HostMachine.TestCase.settings = settings(
        max_examples=int(os.environ.get("HOST_EXAMPLES", "25")),
        stateful_step_count=12,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    HostMachine.TestCase().runTest()
