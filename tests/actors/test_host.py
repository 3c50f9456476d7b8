"""The shard host (actors/shard/host.py) against a real PostgreSQL and Redis:
exactly once whatever the history (DESIGN.md), each defect of issue
"exactly-once" as a regression test."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
import pytest

import actors.shard.host as hostmod
from actors.events import decode_change
from actors.shard.host import ShardHost
from actors.user import KEYS_IN_MEMORY, LEDGER_IN_MEMORY
from protocol.messages import Grant, History, Purchase, State
from tests.actors.conftest import HostFactory, apply, durable, fresh_shard, kinds

BOOSTER = "plat.booster.xp"  # 5 gems, stackable, no holding limit

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def grant(user: str, amount: int, key: str, rid: int = 0) -> tuple[str, Grant]:
    return user, Grant(rid=rid, user=user, amount=amount, key=key)


def buy(
    user: str, key: str, rid: int = 0, sku: str = BOOSTER, price: int = 5
) -> tuple[str, Purchase]:
    return user, Purchase(rid=rid, key=key, sku=sku, price=price)


async def make_purchases(host: ShardHost, user: str, count: int) -> list[dict[str, Any]]:
    """``count`` keyed purchases, 50 to a batch; their replies."""
    replies: list[dict[str, Any]] = []
    for start in range(0, count, 50):
        batch = [buy(user, f"buy-{i}", rid=i) for i in range(start, min(count, start + 50))]
        replies += await apply(host, batch)
    assert kinds(replies) == {"purchased": count}
    return replies


BURST = [*range(0, 10), *range(44, 54), *range(150, 160)]


@pytest.mark.parametrize("gems_left", [False, True], ids=["all-spent", "gems-left"])
async def test_old_and_recent_keys_resent_in_one_burst_get_their_original_replies(
    hosts: HostFactory, db: asyncpg.Pool, gems_left: bool
) -> None:
    """Regression (issue exactly-once, 1): keys read back from the journal were
    put in the 256-key window and pushed out keys of other requests of the
    same batch, which were then decided as new: ``insufficient_funds`` for
    charged purchases, or a duplicate that failed the whole flush."""
    user = f"burst-{gems_left}"
    async with hosts() as host:
        await apply(host, [grant(user, 300 * 5 + (500 if gems_left else 0), "fund")])
        originals = await make_purchases(host, user, 300)
        # Durable records beyond the window leave memory (bounded per user).
        assert len(host.residents.users[user].keys) <= KEYS_IN_MEMORY + 50
        assert (await apply(host, [(user, State())]))[0]["balance"] == (500 if gems_left else 0)
        burst = [buy(user, f"buy-{i}", rid=1000 + i) for i in BURST]
        replies = await apply(host, burst)
        for i, reply in zip(BURST, replies, strict=True):
            assert reply == {**originals[i], "rid": 1000 + i}
        stored = await durable(db, user)
        assert stored["balance"] == (500 if gems_left else 0) == stored["ledger"]
        assert len(stored["keys"]) == 301


async def test_a_burst_after_a_restart_and_beside_new_keys_replays_exactly(
    hosts: HostFactory, db: asyncpg.Pool
) -> None:
    user, shard = "burst-restart", fresh_shard()
    async with hosts(shard=shard) as host:
        await apply(host, [grant(user, (300 + KEYS_IN_MEMORY) * 5 + 100, "fund")])
        originals = await make_purchases(host, user, 300)
    async with hosts(shard=shard) as host:  # restored: no key in memory
        news = [buy(user, f"new-{i}", rid=5000 + i) for i in range(KEYS_IN_MEMORY)]
        olds = [buy(user, f"buy-{i}", rid=1000 + i) for i in BURST]
        batch = [x for pair in zip(olds, news[: len(olds)], strict=True) for x in pair]
        batch += news[len(olds) :]
        replies = await apply(host, batch)
        by_rid = {r["rid"]: r for r in replies}
        for i in BURST:
            assert by_rid[1000 + i] == {**originals[i], "rid": 1000 + i}
        assert kinds(replies) == {"purchased": len(batch)}
        again = await apply(host, olds)  # and once more, now from memory
        assert [r["purchase"] for r in again] == [originals[i]["purchase"] for i in BURST]
    stored = await durable(db, user)
    assert stored["balance"] == stored["ledger"] == 100
    assert len(stored["keys"]) == 1 + 300 + KEYS_IN_MEMORY


async def test_a_key_that_left_memory_while_a_batch_waited_is_still_a_replay(
    hosts: HostFactory, db: asyncpg.Pool
) -> None:
    """Regression (issue exactly-once, 2, ``h3``): a key evicted between the
    journal lookup and the apply was applied again, and the journal's unique
    index failed the whole group commit: 258 of 258 replies were errors."""
    user, other = "h3-user", "h3-other"
    async with hosts() as host:
        first = await apply(host, [grant(user, 1, "old", rid=0)])
        host.residents.forget({user})  # passivated: keys come back from the journal
        batch = [grant(user, 1, f"n{i}", rid=i + 1) for i in range(256)]
        batch.insert(0, grant(other, 5, "unrelated", rid=-1))
        batch.append(grant(user, 1, "old", rid=999))  # a retry of the old grant
        replies = await apply(host, batch)
        assert kinds(replies) == {"granted": 258}
        assert replies[-1] == {**first[0], "rid": 999}
    stored = await durable(db, user)
    assert stored["balance"] == stored["ledger"] == 257
    assert (await durable(db, other))["balance"] == 5


async def test_a_duplicate_that_reaches_the_journal_gets_the_original_reply_alone(
    hosts: HostFactory, db: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If a duplicate ever reaches the journal (here: the key lookup is made to
    miss), it resolves to the original record; the rest of its user's batch
    is not applied, and nobody else in the flush is affected."""
    user, other = "dup-user", "dup-other"
    async with hosts() as host:
        first = await apply(host, [grant(user, 3, "k", rid=0)])
        host.residents.forget({user})

        async def miss(wanted: list[tuple[str, str]]) -> dict[Any, Any]:
            return {}

        monkeypatch.setattr(host.residents, "lookup_keys", miss)
        replies = await apply(
            host,
            [grant(other, 5, "o", 1), grant(user, 3, "k", 2), grant(user, 4, "k2", 3)],
        )
        assert replies[0]["type"] == "granted" and replies[0]["balance"] == 5
        assert replies[1] == {**first[0], "rid": 2}
        assert replies[2]["type"] == "error" and replies[2]["code"] == "unavailable"
        assert host.stats()["rejections"] == 1
        monkeypatch.undo()
        # The user reloaded from what is durable and takes requests again.
        again = await apply(host, [grant(user, 4, "k2", 4), grant(user, 3, "k", 5)])
        assert again[0]["type"] == "granted" and again[0]["balance"] == 7
        assert again[1] == {**first[0], "rid": 5}
    stored = await durable(db, user)
    assert stored["balance"] == stored["ledger"] == 7 and stored["keys"] == ["a:k", "a:k2"]


async def test_a_bug_in_domain_code_loses_nothing_acknowledged_and_freezes_no_one(
    hosts: HostFactory, db: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue exactly-once, 4, ``h1``): a non-RequestError dropped
    the user while its records were buffered; a reload before the flush wrote
    new records over the old state row: the acknowledged grant vanished from
    the balance and every later change of the user failed, even after a
    restart."""
    user, bystander, shard = "h1-user", "h1-bystander", fresh_shard()
    real = hostmod.handle

    def buggy(state: Any, request: Any, *args: Any) -> Any:
        if getattr(request, "key", None) == "boom":
            raise RuntimeError("simulated bug in domain code")
        return real(state, request, *args)

    async with hosts(shard=shard, flush_interval=0.3, starting_balance=5000) as host:
        await apply(host, [(user, State())])
        monkeypatch.setattr(hostmod, "handle", buggy)
        a = asyncio.ensure_future(apply(host, [grant(user, 7, "g1", 1), grant(bystander, 3, "b")]))
        await asyncio.sleep(0.01)
        b = asyncio.ensure_future(apply(host, [grant(user, 1, "boom", 2)]))
        await asyncio.sleep(0.01)
        c = asyncio.ensure_future(apply(host, [(user, State(rid=3))]))
        (ra, rbystander), rb, rc = await a, (await b)[0], (await c)[0]
        monkeypatch.undo()
        assert rbystander["type"] == "granted"  # nobody else is affected
        assert rb["code"] == "internal"
        acknowledged = 7 if ra["type"] == "granted" else 0
        assert ra["type"] == "granted" or ra["code"] == "unavailable"
        assert rc["type"] == "state" and rc["balance"] == 5000 + acknowledged
        later = await apply(host, [grant(user, 1, f"after{i}", 10 + i) for i in range(2)])
        assert kinds(later) == {"granted": 2}
        retry = await apply(host, [grant(user, 7, "g1", 20)])  # the client retries its key
        assert retry[0]["type"] == "granted"
    async with hosts(shard=shard, starting_balance=5000) as host:  # and after a restart
        state = (await apply(host, [(user, State())]))[0]
        assert state["balance"] == 5000 + 7 + 2
        assert kinds(await apply(host, [grant(user, 1, "restarted")])) == {"granted": 1}
    stored = await durable(db, user)
    assert stored["balance"] == stored["ledger"] == 5000 + 7 + 2 + 1
    assert stored["versions"] == list(range(1, len(stored["versions"]) + 1))
    assert stored["version"] == stored["versions"][-1]


async def test_history_pages_through_the_whole_ledger_of_a_new_user(
    hosts: HostFactory,
) -> None:
    """Regression (issue exactly-once, 5): ``history`` stopped at 200 entries
    for every user created since their shard last started."""
    user, total = "history-user", 1_050
    async with hosts() as host:
        for start in range(0, total, 150):
            await apply(
                host, [grant(user, 1, f"g{i}") for i in range(start, min(total, start + 150))]
            )
        for limit in (200, 37):
            seqs: list[int] = []
            before = None
            while True:
                page = (await apply(host, [(user, History(before=before, limit=limit))]))[0]
                seqs += [e["seq"] for e in page["entries"]]
                if page["next"] is None:
                    break
                before = page["next"]
            assert seqs == list(range(total, 0, -1)), limit
        assert total > LEDGER_IN_MEMORY


async def test_a_failed_flush_says_the_outcome_is_unknown(
    hosts: HostFactory, db: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue exactly-once, 7: ``unavailable`` after a failed flush must not
    claim that nothing was applied (PROTOCOL.md §5)."""
    caplog.set_level(logging.CRITICAL)
    user, shard = "unknown-outcome", fresh_shard()
    async with hosts(shard=shard) as host:
        await apply(host, [grant(user, 1, "first")])
        await db.execute("UPDATE shard_epochs SET epoch = epoch + 1 WHERE shard = $1", shard)
        reply = (await apply(host, [grant(user, 1, "second")]))[0]
        assert reply["code"] == "unavailable"
        assert "may or may not" in reply["message"]


async def test_each_key_is_journaled_once_and_replays_from_the_journal_record(
    hosts: HostFactory, db: asyncpg.Pool
) -> None:
    user = "journal-replay"
    async with hosts() as host:
        first = (await apply(host, [buy(user, "x")]))[0]
        assert first["code"] == "insufficient_funds"  # refused: no record, key free
        await apply(host, [grant(user, 10, "fund")])
        bought = (await apply(host, [buy(user, "x", rid=7)]))[0]
        host.residents.forget({user})
        again = (await apply(host, [buy(user, "x", rid=8)]))[0]
        assert again == {**bought, "rid": 8}
    row = await db.fetchrow("SELECT change FROM journal WHERE user_id = $1 AND key = 'p:x'", user)
    change = decode_change(row["change"])
    assert change.fingerprint is not None and change.fingerprint[:1] == b"\x02"


async def test_a_key_applied_while_a_batch_waits_stays_reachable_until_it_applies(
    hosts: HostFactory, db: asyncpg.Pool
) -> None:
    """A batch looks its keys up, then awaits (here: a reservation); meanwhile
    another batch uses one of its keys, makes it durable and adds hundreds
    more.  The held user keeps that key in memory, so the waiting batch
    replays it instead of applying it twice."""
    release = asyncio.Event()
    box: dict[str, ShardHost] = {}

    async def call(shard: int, version: int, steps: list[Any]) -> list[Any]:
        if release.is_set() is False and steps[0].step.value == "reserve":
            await release.wait()
        return await box["host"].apply_steps(version, steps)

    user = "held-keys"
    async with hosts(call=call, starting_balance=5000) as host:
        box["host"] = host
        await apply(host, [(user, State())])
        first = asyncio.ensure_future(
            apply(
                host,
                [
                    (user, Purchase(rid=1, key="limited", sku="br.rifle.founders", price=1000)),
                    grant(user, 1, "K", rid=2),
                ],
            )
        )
        await asyncio.sleep(0.2)  # the first batch now waits for its reservation
        other = await apply(
            host, [grant(user, 1, "K", rid=3)] + [grant(user, 1, f"more{i}") for i in range(300)]
        )
        assert kinds(other) == {"granted": 301}
        release.set()
        replies = await first
        assert replies[0]["type"] == "purchased"
        assert replies[1] == {**other[0], "rid": 2}
        assert host.stats()["rejections"] == 0
    stored = await durable(db, user)
    assert stored["keys"].count("a:K") == 1
    assert stored["balance"] == stored["ledger"] == 5000 - 1000 + 301
