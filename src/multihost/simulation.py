"""Pure simulation of a traffic IP group through fail/recover events.

Owns: parsing ``fail:NAME`` / ``recover:NAME`` events, naming slots by member position,
and turning each step into shares, moved fraction and transfers between named members.
Must not: print, read files or touch the kernel (``cli.simulate`` renders the result).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from multihost.assignment import (
    MAX_SLOTS,
    Assignment,
    PreferenceTable,
    assign,
    default_table,
    moved_buckets,
    transfers,
)


class SimulationError(ValueError):
    """An invalid member list or event (the message names it)."""


@dataclass(frozen=True)
class Event:
    kind: str  # "fail" | "recover"
    member: str

    def __str__(self) -> str:
        return f"{self.kind} {self.member}"


@dataclass(frozen=True)
class NamedTransfer:
    source: str
    target: str
    share: Fraction


@dataclass(frozen=True)
class Step:
    event: str  # "start" or "fail D" / "recover D"
    live: tuple[str, ...]
    shares: dict[str, Fraction]
    moved: Fraction
    transfers: tuple[NamedTransfer, ...]
    assignment: Assignment


@dataclass(frozen=True)
class Simulation:
    buckets: int
    members: tuple[str, ...]
    steps: tuple[Step, ...]


def parse_members(text: str, option: str = "--members") -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise SimulationError(f"{option}: no member names given")
    if len(names) > MAX_SLOTS:
        raise SimulationError(f"{option}: {len(names)} members given, at most {MAX_SLOTS}")
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise SimulationError(f"{option}: member {dup!r} is listed twice")
    return names


def parse_event(text: str) -> Event:
    kind, sep, member = text.partition(":")
    if not sep or kind not in ("fail", "recover") or not member:
        raise SimulationError(f"--event {text!r}: expected fail:NAME or recover:NAME")
    return Event(kind, member)


def simulate(
    members: Sequence[str], events: Sequence[Event], table: PreferenceTable | None = None
) -> Simulation:
    """Run ``events`` from the all-live state; member ``i`` occupies slot ``i``."""
    tbl = table if table is not None else default_table()
    if len(members) > tbl.slots:
        raise SimulationError(f"{len(members)} members, the table has {tbl.slots} slots")
    slot = {m: i for i, m in enumerate(members)}
    live = set(members)
    before = assign(slot.values(), tbl)
    steps = [_step("start", members, before, before)]
    for ev in events:
        if ev.member not in slot:
            raise SimulationError(
                f"event {ev.kind}:{ev.member}: unknown member {ev.member!r}"
                f" (members: {','.join(members)})"
            )
        if ev.kind == "fail":
            if ev.member not in live:
                raise SimulationError(f"event fail:{ev.member}: {ev.member} is already failed")
            live.discard(ev.member)
        else:
            if ev.member in live:
                raise SimulationError(f"event recover:{ev.member}: {ev.member} is not failed")
            live.add(ev.member)
        after = assign((slot[m] for m in live), tbl)
        steps.append(_step(str(ev), members, before, after))
        before = after
    return Simulation(tbl.buckets, tuple(members), tuple(steps))


def _step(event: str, members: Sequence[str], before: Assignment, after: Assignment) -> Step:
    total = after.buckets_total
    live = tuple(m for i, m in enumerate(members) if i in after.live)
    shares = {m: after.share(i) for i, m in enumerate(members) if i in after.live}

    def name(s: int | None) -> str:
        return "(none)" if s is None else members[s]

    moves = tuple(
        NamedTransfer(name(t.source), name(t.target), Fraction(t.buckets, total))
        for t in transfers(before, after)
    )
    return Step(event, live, shares, Fraction(moved_buckets(before, after), total), moves, after)


def fraction_text(f: Fraction) -> str:
    """``"1/12"``, ``"0"`` or ``"1"``: reduced, as the JSON contract spells fractions."""
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"
