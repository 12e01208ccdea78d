"""Pure simulation of a traffic IP group through fail/recover events.

Owns: parsing ``fail:NAME`` / ``recover:NAME`` events, ``--slots`` and ``--weights``,
naming slots by member (its configured slot, or its position when none is given), and
turning each step into shares, moved fraction and transfers between named members.
Must not: print, read files or touch the kernel (``cli.simulate`` renders the result).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from multihost.assignment import (
    Assignment,
    PreferenceTable,
    assign,
    moved_buckets,
    transfers,
)
from multihost.tablechoice import MAX_TABLE_SLOTS, TableChoiceError, cluster_table, table_identity

MAX_SLOTS = MAX_TABLE_SLOTS  # node slots 0..15 (the heartbeat's 16-bit masks)


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
    slots: tuple[int, ...] = ()  # members[i] occupies slots[i]
    weights: tuple[int, ...] = ()  # members[i] has weight weights[i] (virtual slots)
    table: str = ""  # the table's name (tablechoice.table_identity)


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


def parse_slots(text: str, members: Sequence[str], option: str = "--slots") -> tuple[int, ...]:
    """``"1,3"``: the slot of each member, in ``--members`` order."""
    parts = [t.strip() for t in text.split(",")]
    try:
        slots = tuple(int(t) for t in parts)
    except ValueError:
        raise SimulationError(f"{option} {text!r}: expected slot numbers, e.g. 1,3") from None
    if len(slots) != len(members):
        raise SimulationError(
            f"{option} {text!r}: {len(slots)} slots for {len(members)} members"
            f" ({','.join(members)})"
        )
    for s in slots:
        if not 0 <= s < MAX_SLOTS:
            raise SimulationError(f"{option} {text!r}: slot {s} is outside 0..{MAX_SLOTS - 1}")
        if slots.count(s) > 1:
            raise SimulationError(f"{option} {text!r}: slot {s} is given twice")
    return slots


def parse_weights(text: str, members: Sequence[str], option: str = "--weights") -> tuple[int, ...]:
    """``"A=2,B=1"``: each member's weight (integer >= 1; members not named weigh 1), in
    ``--members`` order; their sum is at most :data:`MAX_SLOTS` (the table's slots)."""
    weights = dict.fromkeys(members, 1)
    for part in (t.strip() for t in text.split(",") if t.strip()):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in weights:
            raise SimulationError(
                f"{option} {part!r}: expected MEMBER=WEIGHT with a member of {','.join(members)}"
            )
        try:
            w = int(value)
        except ValueError:
            raise SimulationError(
                f"{option} {part!r}: weight {value!r} is not an integer"
            ) from None
        if w < 1:
            raise SimulationError(f"{option} {part!r}: weight {w} must be at least 1")
        weights[name] = w
    total = sum(weights.values())
    if total > MAX_SLOTS:
        raise SimulationError(
            f"{option} {text!r}: the weights add up to {total}; a table holds at most"
            f" {MAX_SLOTS} slots"
        )
    return tuple(weights[m] for m in members)


def member_table(
    slots: Sequence[int], weights: Sequence[int] | None = None, kind: str = "factorial"
) -> PreferenceTable:
    """The ``kind`` table (``[cluster] table``) a cluster of these members (at ``slots``, of
    ``weights``) uses, chosen as the agents choose it
    (:func:`multihost.tablechoice.cluster_table`)."""
    w = list(weights) if weights is not None else [1] * len(slots)
    try:
        return cluster_table(tuple(sorted(zip(slots, w, strict=True))), kind)
    except TableChoiceError as e:
        raise SimulationError(str(e)) from None


def parse_event(text: str) -> Event:
    kind, sep, member = text.partition(":")
    if not sep or kind not in ("fail", "recover") or not member:
        raise SimulationError(f"--event {text!r}: expected fail:NAME or recover:NAME")
    return Event(kind, member)


def simulate(
    members: Sequence[str],
    events: Sequence[Event],
    table: PreferenceTable | None = None,
    slots: Sequence[int] | None = None,
    weights: Sequence[int] | None = None,
) -> Simulation:
    """Run ``events`` from the all-live state; member ``members[i]`` occupies slot
    ``slots[i]`` (default: slot ``i``), as ``[[node]].slot`` places it in a cluster, with
    weight ``weights[i]`` (default 1).  ``table``: the cluster's (default: the one the
    agents would choose for these slots and weights)."""
    slot_list = list(range(len(members))) if slots is None else list(slots)
    if len(slot_list) != len(members):
        raise SimulationError(f"{len(slot_list)} slots given for {len(members)} members")
    weight_list = [1] * len(members) if weights is None else list(weights)
    tbl = table if table is not None else member_table(slot_list, weight_list)
    if len(members) > tbl.slots:
        raise SimulationError(f"{len(members)} members, the table has {tbl.slots} slots")
    for s in slot_list:
        if not 0 <= s < tbl.slots:
            raise SimulationError(f"slot {s} is outside 0..{tbl.slots - 1}")
        if slot_list.count(s) > 1:
            raise SimulationError(f"slot {s} is given twice")
    slot = dict(zip(members, slot_list, strict=True))
    live = set(members)
    before = assign(slot.values(), tbl)
    steps = [_step("start", slot, before, before)]
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
        steps.append(_step(str(ev), slot, before, after))
        before = after
    return Simulation(
        tbl.buckets,
        tuple(members),
        tuple(steps),
        tuple(slot_list),
        tuple(weight_list),
        table_identity(tbl).name,
    )


def _step(event: str, slot: Mapping[str, int], before: Assignment, after: Assignment) -> Step:
    total = after.buckets_total
    live = tuple(m for m, i in slot.items() if i in after.live)
    shares = {m: after.share(i) for m, i in slot.items() if i in after.live}
    by_slot = {i: m for m, i in slot.items()}

    def name(s: int | None) -> str:
        return "(none)" if s is None else by_slot[s]

    moves = tuple(
        NamedTransfer(name(t.source), name(t.target), Fraction(t.buckets, total))
        for t in transfers(before, after)
    )
    return Step(event, live, shares, Fraction(moved_buckets(before, after), total), moves, after)


def fraction_text(f: Fraction) -> str:
    """``"1/12"``, ``"0"`` or ``"1"``: reduced, as the JSON contract spells fractions."""
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"
