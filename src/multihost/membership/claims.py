"""The claim rule of the membership core for one traffic IP group, as pure functions.

Owns: :class:`ClaimInputs` (everything a group's claims depend on: unchanged inputs give
unchanged claims), :func:`group_inputs` (the rule of ``docs/membership.md``, "The claim
rule": why nothing may be claimed, else the live set, the peers' adverts and whether a
departed member freezes takes) and :func:`compute` (the bucket mask the inputs give).

Must not: keep state, read clocks or know the wire format; lease decisions are passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from multihost.assignment import PreferenceTable
from multihost.membership.ownership import BoolArray, GroupLayout, claim_mask, empty, slots_in
from multihost.membership.state import MemberState, PeerRecord


@dataclass(frozen=True)
class ClaimInputs:
    """Everything a group's claims depend on (unchanged inputs: unchanged claims)."""

    blocked: str = ""  # why nothing may be claimed ("" if claiming)
    live: frozenset[int] = frozenset()  # our live set for the group
    adverts: tuple[tuple[int, frozenset[int]], ...] = ()  # (peer slot, its advertised live)
    frozen: bool = False  # a departed member may still serve: take nothing new


def group_inputs(
    g: GroupLayout,
    slot: int,
    peers: Iterable[PeerRecord],
    *,
    ineligible: bool,
    quorum_ok: bool,
    in_grace: bool,
    leased: Callable[[PeerRecord], bool],
    unsafe: set[str],
) -> ClaimInputs:
    """The inputs of group ``g``'s claims.  ``peers``: the other members of ``g``;
    ``leased(p)``: we hold a fresh lease from alive ``p``, or need none (suspect);
    ``unsafe``: departed members whose buckets may not be taken yet."""
    if ineligible:
        return ClaimInputs("ineligible")
    if not quorum_ok:
        return ClaimInputs("no-quorum")
    peers = list(peers)
    if in_grace and any(p.state is MemberState.UNKNOWN for p in peers):
        return ClaimInputs("grace")  # a member never heard may be serving anything
    live = {slot}
    adverts: list[tuple[int, frozenset[int]]] = []
    for p in peers:
        hb = p.heartbeat
        if p.state is not MemberState.ALIVE or hb is None:
            continue
        if not leased(p):
            return ClaimInputs("lease")
        if not hb.draining and not hb.suspended_groups >> g.index & 1:
            live.add(p.slot)
        if hb.held_groups >> g.index & 1 and hb.applied_view >> p.slot & 1:
            adverts.append((p.slot, slots_in(hb.applied_view) & g.slots))
    frozen = any(p.name in unsafe for p in peers)
    return ClaimInputs("", frozenset(live), tuple(adverts), frozen)


def compute(table: PreferenceTable, slot: int, key: ClaimInputs, current: BoolArray) -> BoolArray:
    """The claims ``key`` gives in ``table`` (while frozen: no bucket beyond ``current``)."""
    if key.blocked:
        return empty(table.buckets)
    return claim_mask(table, slot, key.live, key.adverts, current if key.frozen else None)
