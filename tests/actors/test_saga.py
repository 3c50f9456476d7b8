"""The saga on allowances: its pure decisions (actors/saga.py), then the
coordinator (actors/shard/coordinator.py) against a real PostgreSQL."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from actors.allowance import allowance_id
from actors.catalog import Catalog, demo_catalog_text, parse_catalog
from actors.saga import (
    SETTLE_AFTER_MS,
    Answer,
    Need,
    Result,
    SagaStep,
    Step,
    left_behind,
    needs_reservation,
    reservation_id,
    settlement,
)
from actors.shard.host import ShardHost
from actors.user import UserState, new_user
from protocol.messages import Purchase, Redeem, State
from tests.actors.conftest import HostFactory, apply, kinds

FOUNDERS = "br.rifle.founders"  # 1,000 gems, stock 500
CODE = "WELCOME-2026"  # max 10,000 uses, once per user
DEMO = Catalog.from_document(1, parse_catalog(demo_catalog_text()))
NOW = 1_800_000_000_000


def rich(gems: int = 10_000) -> UserState:
    state, _ = new_user("saga-user", gems, NOW)
    return state


# ------------------------------------------------------------------ decisions


def test_a_limited_item_needs_its_quantity_of_stock() -> None:
    request = Purchase(key="k", sku=FOUNDERS, price=1000)
    assert needs_reservation(rich(), request, DEMO, NOW) == Need(allowance_id("stock", FOUNDERS), 1)


def test_what_the_user_refuses_anyway_reserves_nothing() -> None:
    assert needs_reservation(rich(), Purchase(key="k", sku=FOUNDERS, price=1), DEMO, NOW) is None
    poor = rich(10)  # the balance may still rise before the purchase applies
    assert needs_reservation(poor, Purchase(key="k", sku=FOUNDERS, price=1000), DEMO, NOW)
    assert (
        needs_reservation(rich(), Purchase(key="k", sku="plat.life.extra", price=20), DEMO, NOW)
        is None
    )
    assert needs_reservation(rich(), Redeem(key="k", code="NO-SUCH"), DEMO, NOW) is None
    redeemed = rich()
    redeemed.redeemed.add(CODE)
    assert needs_reservation(redeemed, Redeem(key="k", code=CODE), DEMO, NOW) is None


def test_a_promo_code_needs_one_use() -> None:
    assert needs_reservation(rich(), Redeem(key="k", code=CODE), DEMO, NOW) == Need(
        allowance_id("promo", CODE), 1
    )


def test_settlement_confirms_a_sale_releases_what_it_made_and_leaves_the_rest() -> None:
    assert settlement(Result.SOLD, created=True) is Step.CONFIRM
    assert settlement(Result.SOLD, created=False) is Step.CONFIRM  # a lost attempt's unit
    assert settlement(Result.UNUSED, created=True) is Step.RELEASE
    # Found, not made: an earlier attempt may still sell with it.
    assert settlement(Result.UNUSED, created=False) is None
    assert settlement(Result.UNKNOWN, created=True) is None


def test_the_sweeper_confirms_only_a_sale_made_with_this_reservation() -> None:
    assert left_behind(100, 300, [200]) is Step.CONFIRM  # sold, then a retry moved it
    assert left_behind(100, 300, []) is Step.ABANDON
    # A sale under the same id before this reservation was made: confirmed already.
    assert left_behind(100, 300, [50]) is Step.ABANDON
    assert left_behind(0, 300, [300]) is Step.CONFIRM  # a state from before ``since``
    assert left_behind(0, 300, [200]) is Step.ABANDON


def test_a_reservation_is_the_user_key_and_request() -> None:
    assert reservation_id("u", "k", "f1") == reservation_id("u", "k", "f1")
    assert reservation_id("u", "k", "f1") != reservation_id("u", "k", "f2")
    step = SagaStep(Step.RESERVE, "stock:x", "u/k/a.1", 1, 5, "u", "k")
    assert step.then(Step.CONFIRM) == SagaStep(Step.CONFIRM, "stock:x", "u/k/a.1", 1, 5, "u", "k")


# ---------------------------------------------------------------- coordinator


async def stock_used(host: ShardHost, sku: str) -> tuple[int, int]:
    """(used, reserved) of a limited item's stock (other tests' leftovers too)."""
    return await usage(host, allowance_id("stock", sku))


async def usage(host: ShardHost, entity: str) -> tuple[int, int]:
    await host.residents.activate({entity}, lambda user, state: None)
    held = host.residents.allowances[entity].state
    return held.used, sum(r.quantity for r in held.reservations.values())


async def test_a_retry_reserving_after_the_original_confirmed_uses_no_second_unit(
    hosts: HostFactory, db: asyncpg.Pool
) -> None:
    """Regression (issue exactly-once, 3, ``h2``): the same key arriving again
    (a client retrying through another gateway) reserved a fresh unit after
    the original's confirm, and its replay confirmed it: 2 units for 1 sale."""
    confirmed = asyncio.Event()
    reserves = 0
    box: dict[str, ShardHost] = {}

    async def call(shard: int, version: int, steps: list[SagaStep]) -> list[Answer]:
        nonlocal reserves
        if steps[0].step is Step.RESERVE:
            reserves += 1
            if reserves == 2:  # the retry's reserve: a slower Ray call
                await confirmed.wait()
        out = await box["host"].apply_steps(version, steps)
        if steps[0].step is Step.CONFIRM:
            confirmed.set()
        return out

    user = "h2-user"
    async with hosts(call=call, starting_balance=5000) as host:
        box["host"] = host
        await apply(host, [(user, State())])
        used, reserved = await stock_used(host, FOUNDERS)  # other tests' leftovers too
        before = host.stock_left(FOUNDERS)
        assert before is not None
        purchase = Purchase(rid=1, key="buy-founders", sku=FOUNDERS, price=1000)
        x, y = await asyncio.gather(
            apply(host, [(user, purchase)]), apply(host, [(user, purchase)])
        )
        assert x[0]["type"] == y[0]["type"] == "purchased"
        assert x[0]["purchase"] == y[0]["purchase"]
        for _ in range(50):  # the settling steps run in the background
            if (await stock_used(host, FOUNDERS))[1] == reserved:
                break
            await asyncio.sleep(0.05)
        assert (await stock_used(host, FOUNDERS)) == (used + 1, reserved)
        assert host.stock_left(FOUNDERS) == before - 1
        state = (await apply(host, [(user, State())]))[0]
        assert state["balance"] == 4000


async def test_a_promo_code_redeemed_twice_at_once_uses_one_use(hosts: HostFactory) -> None:
    user = "promo-twice"
    async with hosts() as host:
        used, reserved = await usage(host, allowance_id("promo", CODE))
        redeem = Redeem(rid=1, key="r", code=CODE)
        x, y = await asyncio.gather(apply(host, [(user, redeem)]), apply(host, [(user, redeem)]))
        assert x[0]["type"] == y[0]["type"] == "redeemed"
        for _ in range(50):
            if (await usage(host, allowance_id("promo", CODE)))[1] == reserved:
                break
            await asyncio.sleep(0.05)
        assert await usage(host, allowance_id("promo", CODE)) == (used + 1, reserved)


async def test_the_sweeper_confirms_a_recorded_sale_and_releases_the_rest(
    hosts: HostFactory, db: asyncpg.Pool
) -> None:
    user = "sweeper-user"
    async with hosts(starting_balance=5000) as host:
        entity = allowance_id("stock", FOUNDERS)
        await apply(host, [(user, State())])
        deadline = 1_000  # long past
        sold = SagaStep(Step.RESERVE, entity, "sweeper-user/a/t.1", 1, deadline, user, "a")
        lost = SagaStep(Step.RESERVE, entity, "sweeper-user/b/t.2", 1, deadline, user, "b")
        granted = await host.apply_steps(host.catalog.version, [sold, lost])
        assert granted == [Answer(deadline, created=True)] * 2
        await db.execute(
            "INSERT INTO reservation_outcomes (res, deadline, outcome) VALUES ($1, $2, 'sold')",
            sold.reservation,
            deadline,
        )
        used, reserved = await stock_used(host, FOUNDERS)
        assert await host.saga.sweep(deadline + SETTLE_AFTER_MS + 1) == 2
        assert (await stock_used(host, FOUNDERS)) == (used + 1, reserved - 2)
        outcomes = await db.fetch(
            "SELECT res, outcome FROM reservation_outcomes WHERE res LIKE 'sweeper-user/%'"
        )
        assert sorted((r["res"], r["outcome"]) for r in outcomes) == [
            (sold.reservation, "sold"),
            (lost.reservation, "released"),
        ]


async def test_a_purchase_refused_after_its_reservation_releases_the_unit(
    hosts: HostFactory,
) -> None:
    user = "refused-after"
    async with hosts(starting_balance=1000) as host:
        await apply(host, [(user, State())])
        reserved = (await stock_used(host, FOUNDERS))[1]
        first = Purchase(rid=1, key="a", sku=FOUNDERS, price=1000)
        second = Purchase(rid=2, key="b", sku=FOUNDERS, price=1000)
        # Both reserve (each alone was possible); the second is refused: held once.
        replies = await apply(host, [(user, first), (user, second)])
        assert kinds(replies) == {"purchased": 1, "error:limit_exceeded": 1}
        for _ in range(50):
            if (await stock_used(host, FOUNDERS))[1] == reserved:
                break
            await asyncio.sleep(0.05)
        assert (await stock_used(host, FOUNDERS))[1] == reserved


@pytest.mark.parametrize("step", [Step.CONFIRM, Step.RELEASE])
async def test_settling_an_unknown_reservation_changes_nothing(
    hosts: HostFactory, step: Step
) -> None:
    async with hosts() as host:
        entity = allowance_id("stock", FOUNDERS)
        ghost = SagaStep(step, entity, "nobody/k/x.1", 1, 5, "nobody", "k")
        assert await host.apply_steps(host.catalog.version, [ghost]) == [Answer(0)]


async def test_a_reservation_whose_answer_was_lost_is_released(
    hosts: HostFactory,
) -> None:
    """Regression: when the allowance's shard reserved a unit but its answer
    was lost (it crashed), the request was answered unavailable and its
    retry reserved another unit: the first stayed held until the sweeper,
    and the item sold out early (22-29 of 50 sold in tests/e2e/test_limited).
    The retry now finds the first attempt's reservation and sells with it."""
    lost = [True]
    box: dict[str, ShardHost] = {}

    async def call(shard: int, version: int, steps: list[SagaStep]) -> list[Answer]:
        out = await box["host"].apply_steps(version, steps)
        if steps[0].step is Step.RESERVE and lost[0]:
            lost[0] = False
            raise ConnectionError("the answer was lost")
        return out

    user = "lost-answer"
    async with hosts(call=call, starting_balance=5000) as host:
        box["host"] = host
        await apply(host, [(user, State())])
        used, reserved = await stock_used(host, FOUNDERS)
        purchase = Purchase(rid=1, key="k", sku=FOUNDERS, price=1000)
        first = (await apply(host, [(user, purchase)]))[0]
        assert first["code"] == "unavailable"
        again = (await apply(host, [(user, purchase)]))[0]
        assert again["type"] == "purchased"
        for _ in range(50):
            if (await stock_used(host, FOUNDERS)) == (used + 1, reserved):
                break
            await asyncio.sleep(0.05)
        assert await stock_used(host, FOUNDERS) == (used + 1, reserved)
