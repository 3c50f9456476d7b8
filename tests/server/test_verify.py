"""The checks of ``loadout verify`` (server/verify.py) as pure functions: a
user's journal, ledger and state row, an allowance's journal and row, and
reservation outcomes, without a database."""

from __future__ import annotations

import msgspec
import pytest

from actors.allowance import AllowanceState, Reservation
from actors.catalog import Catalog, demo_catalog_text, parse_catalog
from actors.events import encode_change
from actors.saga import SagaStep, Step, journaled_step
from actors.user import Mutation, UserState, handle, new_user
from persistence.audit import EntityRow, JournalEntry, LedgerTotal
from persistence.journal import LedgerRow
from protocol.messages import CreateProfile, Equip, Grant, Purchase, Redeem
from server.verify import (
    Check,
    Ended,
    Violation,
    check_allowance,
    check_user,
    outcome_violations,
)

DEMO = Catalog.from_document(1, parse_catalog(demo_catalog_text()))
NOW = 1_700_000_000_000
USER = "alice"
STOCK = "stock:br.rifle.tiger"
_encoder = msgspec.msgpack.Encoder()


def played(*requests: Mutation, starting: int = 100) -> tuple[EntityRow, list[JournalEntry]]:
    """A user's state row and journal (with ledger rows) after these requests."""
    state, first = new_user(USER, starting, NOW)
    changes = [first] if first is not None else []
    for request in requests:
        outcome = handle(state, request, DEMO, NOW, allowance=True)
        assert outcome.change is not None, outcome.reply
        changes.append(outcome.change)
    journal = []
    for change in changes:
        entry = change.ledger
        ledger = None if entry is None else LedgerRow(*msgspec.structs.astuple(entry))
        journal.append(
            JournalEntry(
                USER, change.version, change.kind, change.key, encode_change(change), ledger
            )
        )
    return EntityRow(USER, state.version, state.balance, state.snapshot()), journal


def total(journal: list[JournalEntry]) -> LedgerTotal:
    amounts = [e.ledger.amount for e in journal if e.ledger is not None]
    return LedgerTotal(len(amounts), sum(amounts))


REQUESTS: tuple[Mutation, ...] = (
    Grant(rid=1, user=USER, amount=1000, key="fund"),
    Purchase(rid=2, key="k1", sku="br.rifle.tiger", price=250),
    CreateProfile(rid=3, profile="br", game="br"),
    Equip(rid=4, profile="br", slot="weapon_skin", sku="br.rifle.tiger"),
    Redeem(rid=5, key="k2", code="WELCOME-2026"),
)


def checks(violations: list[Violation]) -> set[tuple[str, Check]]:
    return {(v.entity, v.check) for v in violations}


def test_a_consistent_user_passes() -> None:
    row, journal = played(*REQUESTS)
    assert row.version == 6 and row.balance == 100 + 1000 - 250 + 50
    assert check_user(USER, row, journal, total(journal)) == []


def test_a_balance_the_ledger_does_not_add_up_to() -> None:
    row, journal = played(*REQUESTS)
    short = LedgerTotal(4, total(journal).amount - 250)
    assert checks(check_user(USER, row, journal, short)) == {(USER, Check.LEDGER_SUM)}


def test_a_row_the_journal_does_not_rebuild() -> None:
    row, journal = played(*REQUESTS)
    # The state of a user who stopped after buying: no profile "br", no redeemed code.
    other, _ = played(*REQUESTS[:2])
    wrong = row._replace(state=other.state)
    found = check_user(USER, wrong, journal, total(journal))
    assert checks(found) == {(USER, Check.REPLAY)}
    details = " / ".join(v.detail for v in found)
    assert "inventory differ from the journal's for plat.life.extra" in details
    assert "profiles differ from the journal's for br" in details
    assert "redeemed codes differ from the journal's for WELCOME-2026" in details
    # A balance the ledger agrees with, but the journal does not.
    richer = row._replace(balance=row.balance + 5)
    found = check_user(USER, richer, journal, LedgerTotal(5, richer.balance))
    assert checks(found) == {(USER, Check.REPLAY)}
    assert found[0].detail == "balance 905 in the row, 900 by the journal"


def test_a_negative_balance() -> None:
    row, journal = played(*REQUESTS)
    negative = row._replace(balance=-5)
    found = checks(check_user(USER, negative, journal, LedgerTotal(6, -5)))
    assert (USER, Check.NEGATIVE_BALANCE) in found


def test_a_missing_journal_record_is_a_gap_where_the_replay_stops() -> None:
    row, journal = played(*REQUESTS)
    del journal[2]  # the purchase
    found = checks(check_user(USER, row, journal, total(journal)))
    # the replay stops at the gap instead of reporting the rest as different
    assert found == {(USER, Check.VERSIONS), (USER, Check.LEDGER_SUM)}


def test_a_journal_that_ends_before_the_row() -> None:
    row, journal = played(*REQUESTS)
    found = check_user(USER, row, journal[:-1], total(journal[:-1]))
    assert (USER, Check.VERSIONS) in checks(found)
    assert any("journal ends at version 5" in v.detail for v in found)


def test_journal_records_without_a_state_row() -> None:
    _, journal = played(*REQUESTS)
    assert checks(check_user(USER, None, journal, total(journal))) == {
        (USER, Check.VERSIONS),
        (USER, Check.LEDGER_SUM),
    }


def test_a_key_used_twice() -> None:
    row, journal = played(*REQUESTS)
    journal[4] = journal[4]._replace(key=journal[2].key)  # redeem's row indexed as the purchase
    found = check_user(USER, row, journal, total(journal))
    assert checks(found) == {(USER, Check.KEYS)}
    assert any("used by versions 3 and 5" in v.detail for v in found)


def test_a_ledger_row_that_is_not_its_change() -> None:
    row, journal = played(*REQUESTS)
    purchase = journal[2]
    assert purchase.ledger is not None
    journal[2] = purchase._replace(ledger=purchase.ledger._replace(amount=-200))
    found = checks(check_user(USER, row, journal, total(journal)))
    assert found == {(USER, Check.LEDGER_JOURNAL), (USER, Check.LEDGER_SUM)}
    journal[2] = purchase._replace(ledger=None)
    missing = check_user(USER, row, journal, LedgerTotal(4, row.balance))
    assert checks(missing) == {(USER, Check.LEDGER_JOURNAL)}
    assert "has no ledger row" in missing[0].detail


def test_an_undecodable_change_stops_the_replay() -> None:
    row, journal = played(*REQUESTS)
    journal[1] = journal[1]._replace(change=b"\xc1")
    found = check_user(USER, row, journal, total(journal))
    assert checks(found) == {(USER, Check.REPLAY)}
    assert "version 2 does not decode" in found[0].detail


# ------------------------------------------------------------------ allowances


def step(kind: Step, res: str, quantity: int = 1, deadline: int = NOW) -> SagaStep:
    return SagaStep(kind, STOCK, res, quantity, deadline, "bob", "key")


def allowance_journal(*steps: SagaStep) -> list[JournalEntry]:
    return [
        JournalEntry(STOCK, v, "allowance." + s.step.value, None, _encoder.encode(s), None)
        for v, s in enumerate(steps, start=1)
    ]


def allowance_row(version: int, used: int, **held: Reservation) -> EntityRow:
    return EntityRow(STOCK, version, 0, _encoder.encode(AllowanceState(used, held)))


SAGA = (
    step(Step.RESERVE, "r1", 2),
    step(Step.RESERVE, "r2"),
    step(Step.RESERVE, "r3"),
    step(Step.CONFIRM, "r1", 2),
    step(Step.RELEASE, "r2"),
)


def test_a_consistent_allowance_passes() -> None:
    row = allowance_row(5, 2, r3=Reservation(1, NOW, "bob", "key"))
    assert check_allowance(STOCK, row, allowance_journal(*SAGA), {}) == []


def test_used_is_the_sum_of_the_confirmed_quantities() -> None:
    row = allowance_row(5, 3, r3=Reservation(1, NOW, "bob", "key"))
    found = check_allowance(STOCK, row, allowance_journal(*SAGA), {})
    assert checks(found) == {(STOCK, Check.USED)}
    assert "used 3 in the state row, the journal confirms 2" in found[0].detail


def test_a_reservation_that_vanished_or_appeared() -> None:
    vanished = allowance_row(5, 2)
    assert checks(check_allowance(STOCK, vanished, allowance_journal(*SAGA), {})) == {
        (STOCK, Check.RESERVATIONS)
    }
    extra = Reservation(1, NOW, "eve", "key")
    appeared = allowance_row(5, 2, r3=Reservation(1, NOW, "bob", "key"), r9=extra)
    found = check_allowance(STOCK, appeared, allowance_journal(*SAGA), {})
    assert checks(found) == {(STOCK, Check.RESERVATIONS)}
    assert "r9 is held in the state row but never reserved" in found[0].detail


def test_a_reservation_ended_twice() -> None:
    journal = allowance_journal(*SAGA, step(Step.RELEASE, "r1", 2))
    row = allowance_row(6, 2, r3=Reservation(1, NOW, "bob", "key"))
    found = check_allowance(STOCK, row, journal, {})
    assert checks(found) == {(STOCK, Check.RESERVATIONS)}
    assert "r1 ends (release) at version 6 but is not held" in found[0].detail


def test_a_reservation_held_again_after_it_ended_is_a_new_one() -> None:
    """Reservation ids were per key before issue 9: the same id could be
    reserved again once released, and confirmed then."""
    journal = allowance_journal(*SAGA, step(Step.RESERVE, "r2"), step(Step.CONFIRM, "r2"))
    row = allowance_row(7, 3, r3=Reservation(1, NOW, "bob", "key"))
    assert check_allowance(STOCK, row, journal, {}) == []


def test_records_written_before_steps_were_typed_still_replay() -> None:
    untyped = [
        JournalEntry(
            STOCK, v, "allowance." + s.step.value, None,
            _encoder.encode((s.step.value, s.reservation, s.quantity, s.deadline, s.user, s.key)),
            None,
        )
        for v, s in enumerate(SAGA, start=1)
    ]  # fmt: skip
    assert journaled_step(STOCK, untyped[0].change) == SAGA[0]
    row = allowance_row(5, 2, r3=Reservation(1, NOW, "bob", "key"))
    assert check_allowance(STOCK, row, untyped, {}) == []
    with pytest.raises(msgspec.DecodeError):
        journaled_step(STOCK, _encoder.encode(("reserve", "r1")))


def test_a_gap_in_an_allowance_journal_skips_the_sums() -> None:
    journal = allowance_journal(*SAGA)
    del journal[0]  # r1's reserve: its confirm cannot be judged any more
    row = allowance_row(5, 2, r3=Reservation(1, NOW, "bob", "key"))
    assert checks(check_allowance(STOCK, row, journal, {})) == {(STOCK, Check.VERSIONS)}


def test_an_end_that_contradicts_the_recorded_outcome() -> None:
    row = allowance_row(5, 2, r3=Reservation(1, NOW, "bob", "key"))
    sold_but_released = {("r2", NOW): "sold", ("r1", NOW): "sold"}
    found = check_allowance(STOCK, row, allowance_journal(*SAGA), sold_but_released)
    assert checks(found) == {(STOCK, Check.OUTCOMES)}
    assert found[0].detail == "r2 was sold but released at version 5"
    other_deadline = {("r2", NOW + 1): "sold"}  # another reservation under that id
    assert check_allowance(STOCK, row, allowance_journal(*SAGA), other_deadline) == []
    released_but_confirmed = [Ended(STOCK, "r1", NOW, Step.CONFIRM, 4)]
    assert checks(outcome_violations(released_but_confirmed, {("r1", NOW): "released"})) == {
        (STOCK, Check.OUTCOMES)
    }


def test_user_state_restore_is_what_replay_compares() -> None:
    """The comparison is by content: a row whose bytes differ (dict order)
    but whose state is the same passes."""
    row, journal = played(*REQUESTS)
    state = UserState.restore(USER, row.version, row.balance, row.state)
    state.inventory = dict(reversed(list(state.inventory.items())))
    assert len(state.inventory) == 2
    reordered = row._replace(state=state.snapshot())
    assert reordered.state != row.state
    assert check_user(USER, reordered, journal, total(journal)) == []


def test_a_journal_row_whose_kind_is_not_its_change() -> None:
    row, journal = played(*REQUESTS)
    journal[3] = journal[3]._replace(kind="grant")  # the create_profile change
    found = check_user(USER, row, journal, total(journal))
    assert checks(found) == {(USER, Check.REPLAY)}
    assert found[0].detail == "version 4 is a 'grant' row of a 'create_profile' change"
