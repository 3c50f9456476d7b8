"""``loadout verify``: the database checked against itself, offline.

Every change of an entity is journaled, and the ``users`` row is a cache of
what the journal rebuilds (DESIGN.md; ``actors.user.evolve``).  So the
journal proves the rows, and the rows, the ledger and the reservation
outcomes must agree with it.  The checks (``Check``):

* ``ledger_sum``, ``negative_balance``: a user's balance is the sum of its
  ledger amounts, and never negative;
* ``journal_versions``: an entity's journal versions are 1..N with no gap,
  and its state row is at version N;
* ``replay``: replaying the journal from a new user (a starting credit is
  itself version 1) gives the row's balance and state;
* ``idempotency_keys``: a key is used at most once per user;
* ``ledger_journal``: every ledger row is the ledger entry of the journal
  change of its ``seq``, and every change that moves gems has one;
* ``reservations``: per reservation of an allowance (``stock:<sku>``,
  ``promo:<code>``), what was reserved was confirmed, released or abandoned
  once, or is still held in the allowance's row;
* ``allowance_used``: an allowance's ``used`` is the sum of its confirmed
  quantities;
* ``reservation_outcomes``: a reservation recorded as sold was not released,
  and one recorded as released was not confirmed.

The folds (``UserReplay``, ``AllowanceReplay``) and ``outcome_violations``
are pure; ``verify`` feeds them the database one range of ids at a time
(``persistence.audit``), so memory holds a chunk of state rows, one entity's
fold, the reservations an allowance holds open and the violations found,
whatever the size of the database.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import NamedTuple

import asyncpg
import msgspec
from msgspec import Struct

from actors.events import decode_change
from actors.saga import Step, journaled_step
from actors.shard.residents import allowance_decoder, is_allowance
from actors.user import UserState, evolve, new_user
from persistence import audit
from persistence.audit import EntityRow, JournalEntry, LedgerTotal
from persistence.journal import LedgerRow
from protocol.messages import LedgerEntry

__all__ = [
    "CHUNK",
    "AllowanceReplay",
    "Check",
    "Ended",
    "Report",
    "UserReplay",
    "Violation",
    "check_allowance",
    "check_user",
    "outcome_violations",
    "verify",
]

log = logging.getLogger("loadout.verify")

#: State rows read at a time (keyset pagination over ``users.user_id``).
CHUNK = 1000
#: Ended reservations whose recorded outcomes are looked up in one query.
_OUTCOME_BATCH = 1000
_DONE = {
    Step.RESERVE: "reserved",
    Step.CONFIRM: "confirmed",
    Step.RELEASE: "released",
    Step.ABANDON: "abandoned",
}


class Check(StrEnum):
    LEDGER_SUM = "ledger_sum"
    NEGATIVE_BALANCE = "negative_balance"
    VERSIONS = "journal_versions"
    REPLAY = "replay"
    KEYS = "idempotency_keys"
    LEDGER_JOURNAL = "ledger_journal"
    RESERVATIONS = "reservations"
    USED = "allowance_used"
    OUTCOMES = "reservation_outcomes"


class Violation(Struct, frozen=True):
    entity: str
    check: Check
    detail: str


class Report(Struct):
    """What ``loadout verify --json`` prints."""

    ok: bool
    users: int
    allowances: int
    violations: list[Violation]


class _Versions:
    """Journal versions must run 1, 2, ... N with no gap."""

    def __init__(self) -> None:
        self.last = 0
        self.records = 0

    def follows(self, version: int) -> str | None:
        """Take the next record's version; why it does not follow, if it does not."""
        self.records += 1
        expected, self.last = self.last + 1, version
        if version == expected:
            return None
        missing = f"{expected}" if version == expected + 1 else f"{expected}..{version - 1}"
        return f"version {version} follows version {expected - 1}: {missing} missing"

    def against(self, row: EntityRow | None) -> str | None:
        """Does the journal end where the state row is?"""
        if row is None:
            if self.records == 0:
                return None  # nothing but ledger rows: ``ledger_sum`` says so
            return f"{self.records} journal records (to version {self.last}) but no state row"
        if self.records == 0:
            return f"state row at version {row.version} but no journal records"
        if self.last != row.version:
            return f"state row at version {row.version}, journal ends at version {self.last}"
        return None


class UserReplay:
    """A user's journal folded in version order: the state it rebuilds, and
    what does not hold on the way (``add`` each record, then ``finish``)."""

    def __init__(self, user_id: str) -> None:
        self.entity = user_id
        self.state = new_user(user_id, 0, 0)[0]
        self.versions = _Versions()
        self.violations: list[Violation] = []
        #: Why replaying stopped (the rest cannot be rebuilt), if it did.
        self.stopped: str | None = None
        self._keys: dict[str, int] = {}

    def _flag(self, check: Check, detail: str) -> None:
        self.violations.append(Violation(self.entity, check, detail))

    def add(self, entry: JournalEntry) -> None:
        version = entry.version
        gap = self.versions.follows(version)
        if gap is not None:
            self._flag(Check.VERSIONS, gap)
            self.stopped = self.stopped or f"a gap before version {version}"
        if entry.key is not None:
            first = self._keys.setdefault(entry.key, version)
            if first != version:
                self._flag(Check.KEYS, f"key {entry.key!r} used by versions {first} and {version}")
        if self.stopped is not None:
            return
        try:
            change = decode_change(entry.change)
        except msgspec.DecodeError as exc:
            self._stop(f"version {version} does not decode: {exc}")
            return
        if change.version != version:
            self._stop(f"the journal row of version {version} holds change {change.version}")
            return
        if change.kind != entry.kind:
            self._flag(
                Check.REPLAY,
                f"version {version} is a {entry.kind!r} row of a {change.kind!r} change",
            )
        if change.key != entry.key:
            self._flag(
                Check.KEYS,
                f"version {version} is indexed under key {entry.key!r},"
                f" its change has {change.key!r}",
            )
        try:
            evolve(self.state, change)
        except Exception as exc:  # corrupt data fails domain code anywhere: that is the finding
            self._stop(f"version {version} does not apply to version {version - 1}: {exc!r}")
            return
        self._compare_ledger(version, change.ledger, entry.ledger)

    def _stop(self, why: str) -> None:
        self._flag(Check.REPLAY, why)
        self.stopped = why

    def _compare_ledger(
        self, version: int, expected: LedgerEntry | None, row: LedgerRow | None
    ) -> None:
        if expected is None and row is None:
            return
        if expected is None:
            self._flag(
                Check.LEDGER_JOURNAL, f"ledger row {version}, but change {version} moves no gems"
            )
            return
        if row is None:
            self._flag(Check.LEDGER_JOURNAL, f"change {version} moves gems but has no ledger row")
            return
        replayed = LedgerRow(*msgspec.structs.astuple(expected))
        if replayed != row:
            self._flag(
                Check.LEDGER_JOURNAL,
                f"ledger row {version} is {_ledger_text(row)};"
                f" its change says {_ledger_text(replayed)}",
            )

    def finish(self, row: EntityRow | None, ledger: LedgerTotal | None) -> list[Violation]:
        """Compare with the state row and the ledger's total; every violation found."""
        ended = self.versions.against(row)
        if ended is not None:
            self._flag(Check.VERSIONS, ended)
        if row is None:
            if ledger is not None:
                self._flag(
                    Check.LEDGER_SUM,
                    f"{ledger.rows} ledger rows ({ledger.amount}) but no state row",
                )
            return self.violations
        total = ledger.amount if ledger is not None else 0
        if row.balance < 0:
            self._flag(Check.NEGATIVE_BALANCE, f"balance {row.balance}")
        if row.balance != total:
            rows = ledger.rows if ledger is not None else 0
            self._flag(
                Check.LEDGER_SUM, f"balance {row.balance}, its {rows} ledger rows sum to {total}"
            )
        if self.stopped is None and ended is None:
            for difference in _differences(self.state, row):
                self._flag(Check.REPLAY, difference)
        return self.violations


def _ledger_text(row: LedgerRow) -> str:
    return (
        f"{row.kind} {row.amount:+} -> {row.balance} at {row.at}"
        + (f" ({row.quantity} x {row.sku})" if row.sku is not None else "")
        + (f" key {row.key!r}" if row.key is not None else "")
    )


_ABSENT = object()


def _differences(replayed: UserState, row: EntityRow) -> list[str]:
    """How the state row differs from the replayed state (by content, not bytes)."""
    try:
        stored = UserState.restore(row.entity, row.version, row.balance, row.state)
    except msgspec.DecodeError as exc:
        return [f"the state row does not decode: {exc}"]
    out: list[str] = []
    if stored.balance != replayed.balance:
        out.append(f"balance {stored.balance} in the row, {replayed.balance} by the journal")
    parts: list[tuple[str, Mapping[str, object], Mapping[str, object]]] = [
        ("inventory", stored.inventory, replayed.inventory),
        ("profiles", stored.profiles, replayed.profiles),
        ("purchase times", stored.recent, replayed.recent),
        ("redeemed codes", dict.fromkeys(stored.redeemed), dict.fromkeys(replayed.redeemed)),
    ]
    for name, mine, theirs in parts:
        differ = sorted(
            k for k in mine.keys() | theirs.keys() if mine.get(k, _ABSENT) != theirs.get(k, _ABSENT)
        )
        if differ:
            shown = ", ".join(differ[:5]) + (
                f" and {len(differ) - 5} more" if len(differ) > 5 else ""
            )
            out.append(f"{name} differ from the journal's for {shown}")
    return out


def check_user(
    user_id: str,
    row: EntityRow | None,
    journal: Iterable[JournalEntry],
    ledger: LedgerTotal | None,
) -> list[Violation]:
    """Every violation of one user: its state row, journal (in version order)
    and ledger total."""
    replay = UserReplay(user_id)
    for entry in journal:
        replay.add(entry)
    return replay.finish(row, ledger)


class Ended(NamedTuple):
    """A reservation's end as journaled, to compare with its recorded outcome."""

    entity: str
    reservation: str
    deadline: int
    step: Step
    version: int


class _Held(NamedTuple):
    quantity: int
    deadline: int
    version: int


class AllowanceReplay:
    """An allowance's journal folded in version order: the reservations it
    holds open, and the sum of the confirmed ones."""

    def __init__(self, entity: str) -> None:
        self.entity = entity
        self.versions = _Versions()
        self.violations: list[Violation] = []
        self.held: dict[str, _Held] = {}
        self.used = 0
        self.stopped: str | None = None

    def _flag(self, check: Check, detail: str) -> None:
        self.violations.append(Violation(self.entity, check, detail))

    def add(self, entry: JournalEntry) -> Ended | None:
        """Take the next record; the reservation it ends, if it ends one."""
        version = entry.version
        gap = self.versions.follows(version)
        if gap is not None:
            self._flag(Check.VERSIONS, gap)
            self.stopped = self.stopped or f"a gap before version {version}"
        if entry.ledger is not None:
            self._flag(Check.LEDGER_JOURNAL, f"ledger row {version} of an allowance")
        try:
            step = journaled_step(self.entity, entry.change)
        except msgspec.DecodeError as exc:
            self._flag(Check.REPLAY, f"version {version} does not decode: {exc}")
            self.stopped = self.stopped or f"version {version} does not decode"
            return None
        if entry.kind != "allowance." + step.step.value or step.allowance != self.entity:
            self._flag(
                Check.REPLAY,
                f"version {version} is a {entry.kind} record holding a {step.step.value}"
                f" of {step.allowance}",
            )
        res = step.reservation
        if step.step is Step.RESERVE:
            held = self.held.get(res)
            if held is not None and held.quantity != step.quantity:
                self._flag(
                    Check.RESERVATIONS,
                    f"{res} reserved again at version {version} for {step.quantity},"
                    f" held for {held.quantity} since version {held.version}",
                )
            # A new reservation, or a retry moving the deadline later (actors.allowance).
            self.held[res] = _Held(step.quantity, step.deadline, held.version if held else version)
            return None
        held = self.held.pop(res, None)
        if held is None:
            if self.stopped is None:  # else it may have been reserved before the gap
                self._flag(
                    Check.RESERVATIONS,
                    f"{res} ends ({step.step.value}) at version {version} but is not held:"
                    " it ended already or was never reserved",
                )
        else:
            if step.step is Step.CONFIRM:
                self.used += held.quantity
            elif held.deadline != step.deadline:
                self._flag(
                    Check.RESERVATIONS,
                    f"{res} {_DONE[step.step]} at version {version} for deadline {step.deadline},"
                    f" held until {held.deadline}",
                )
        return Ended(self.entity, res, step.deadline, step.step, version)

    def finish(self, row: EntityRow | None, ledger: LedgerTotal | None) -> list[Violation]:
        """Compare with the state row; every violation found."""
        ended = self.versions.against(row)
        if ended is not None:
            self._flag(Check.VERSIONS, ended)
        if ledger is not None:
            self._flag(Check.LEDGER_SUM, f"{ledger.rows} ledger rows of an allowance")
        if row is None:
            return self.violations
        try:
            state = allowance_decoder.decode(row.state)
        except msgspec.DecodeError as exc:
            self._flag(Check.REPLAY, f"the state row does not decode: {exc}")
            return self.violations
        if self.stopped is not None or ended is not None:
            return self.violations  # not the whole journal: nothing to add up
        if state.used != self.used:
            self._flag(
                Check.USED,
                f"used {state.used} in the state row, the journal confirms {self.used}",
            )
        for res in sorted(self.held.keys() | state.reservations.keys()):
            mine, theirs = self.held.get(res), state.reservations.get(res)
            if theirs is None:
                assert mine is not None
                self._flag(
                    Check.RESERVATIONS,
                    f"{res} reserved at version {mine.version} never ended,"
                    " and the state row does not hold it",
                )
            elif mine is None:
                self._flag(Check.RESERVATIONS, f"{res} is held in the state row but never reserved")
            elif (mine.quantity, mine.deadline) != (theirs.quantity, theirs.deadline):
                self._flag(
                    Check.RESERVATIONS,
                    f"{res} held for {theirs.quantity} until {theirs.deadline} in the state row,"
                    f" for {mine.quantity} until {mine.deadline} by the journal",
                )
        return self.violations


def check_allowance(
    entity: str,
    row: EntityRow | None,
    journal: Iterable[JournalEntry],
    outcomes: Mapping[tuple[str, int], str],
) -> list[Violation]:
    """Every violation of one allowance: its state row, journal (in version
    order) and the recorded outcomes of its reservations."""
    replay = AllowanceReplay(entity)
    ended = [e for entry in journal if (e := replay.add(entry)) is not None]
    return replay.finish(row, None) + outcome_violations(ended, outcomes)


def outcome_violations(
    ended: Iterable[Ended], outcomes: Mapping[tuple[str, int], str]
) -> list[Violation]:
    """Reservations whose journaled end contradicts their recorded outcome
    (``reservation_outcomes``, by reservation id and deadline)."""
    out: list[Violation] = []
    for e in ended:
        outcome = outcomes.get((e.reservation, e.deadline))
        if outcome == "sold" and e.step is not Step.CONFIRM:
            detail = f"{e.reservation} was sold but {_DONE[e.step]} at version {e.version}"
        elif outcome == "released" and e.step is Step.CONFIRM:
            detail = f"{e.reservation} was released but confirmed at version {e.version}"
        else:
            continue
        out.append(Violation(e.entity, Check.OUTCOMES, detail))
    return out


class _Run:
    """What a run has found so far, and the ended reservations still to look up."""

    def __init__(self, con: asyncpg.Connection) -> None:
        self.con = con
        self.users = 0
        self.allowances = 0
        self.violations: list[Violation] = []
        self._ended: list[Ended] = []

    def finished(self, violations: list[Violation]) -> None:
        self.violations += violations

    async def ended(self, ended: Ended) -> None:
        self._ended.append(ended)
        if len(self._ended) >= _OUTCOME_BATCH:
            await self.look_up_outcomes()

    async def look_up_outcomes(self) -> None:
        ended, self._ended = self._ended, []
        if ended:
            outcomes = await audit.reservation_outcomes(
                self.con, [(e.reservation, e.deadline) for e in ended]
            )
            self.violations += outcome_violations(ended, outcomes)


async def verify(con: asyncpg.Connection, chunk: int = CHUNK) -> Report:
    """Check the whole database, ``chunk`` state rows at a time, in one
    consistent read-only snapshot."""
    run = _Run(con)
    async with audit.snapshot(con):
        after: str | None = None
        while True:
            rows = await audit.entities(con, after, chunk)
            # The last chunk also takes every id past the last state row.
            upto = rows[-1].entity if len(rows) == chunk else None
            await _verify_range(run, after, upto, rows)
            checked = run.users + run.allowances
            if checked // 100_000 != (checked - len(rows)) // 100_000:
                log.info("verified %d entities, %d violations", checked, len(run.violations))
            if upto is None:
                break
            after = upto
        await run.look_up_outcomes()
    # By entity; each entity's in the order found, which no chunking changes.
    violations = sorted(run.violations, key=lambda v: v.entity)
    return Report(not violations, run.users, run.allowances, violations)


async def _verify_range(
    run: _Run, after: str | None, upto: str | None, rows: list[EntityRow]
) -> None:
    con = run.con
    by_id = {row.entity: row for row in rows}
    for row in rows:
        if is_allowance(row.entity):
            run.allowances += 1
        else:
            run.users += 1
    totals = await audit.ledger_totals(con, after, upto)
    fold: UserReplay | AllowanceReplay | None = None
    seen: set[str] = set()

    def finish(fold: UserReplay | AllowanceReplay) -> None:
        run.finished(fold.finish(by_id.get(fold.entity), totals.get(fold.entity)))

    async for entry in audit.journal_entries(con, after, upto):
        if entry.entity not in seen:
            if fold is not None:
                finish(fold)
            seen.add(entry.entity)
            fold = _fold(entry.entity)
        assert fold is not None
        if isinstance(fold, AllowanceReplay):
            ended = fold.add(entry)
            if ended is not None:
                await run.ended(ended)
        else:
            fold.add(entry)
    if fold is not None:
        finish(fold)
    # State rows with no journal at all, and ledger rows of ids with neither.
    for entity in sorted((by_id.keys() | totals.keys()) - seen):
        finish(_fold(entity))
    run.finished(
        [
            Violation(
                r.entity,
                Check.LEDGER_JOURNAL,
                f"ledger row {r.seq} ({r.amount:+}) has no journal record",
            )
            for r in await audit.stray_ledger(con, after, upto)
        ]
    )


def _fold(entity: str) -> UserReplay | AllowanceReplay:
    return AllowanceReplay(entity) if is_allowance(entity) else UserReplay(entity)
