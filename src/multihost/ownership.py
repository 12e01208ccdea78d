"""Which buckets this node serves, per traffic IP group, for a given live set.  Pure.

Owns: mapping the cluster's node slots and each group's member list onto the assignment
engine (a group is assigned over the slots of its members; other slots are permanently
dead), and the two-phase "release, then take" step used by manual mode (``set-live``).

Must not: touch the kernel or the network; the agent applies what this computes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from multihost.assignment import NO_OWNER, Assignment, PreferenceTable, assign, default_table
from multihost.config import Config


@dataclass(frozen=True)
class GroupOwnership:
    group: str
    live: tuple[str, ...]  # live members of this group
    assignment: Assignment

    def shares(self, slots: Mapping[str, int]) -> dict[str, Fraction]:
        return {m: self.assignment.share(slots[m]) for m in self.live}


def live_slots(
    slots: Mapping[str, int], members: Iterable[str], live: Iterable[str]
) -> frozenset[int]:
    """The slots a group is assigned over: its members' configured slots, live ones only."""
    live_set = set(live)
    return frozenset(slots[m] for m in members if m in live_set)


def group_live_slots(cfg: Config, group: str, live: Iterable[str]) -> frozenset[int]:
    g = next(x for x in cfg.groups if x.name == group)
    return live_slots(cfg.slots, g.members, live)


def bucket_owner(
    slots: Mapping[str, int],
    members: Sequence[str],
    live: Iterable[str],
    bucket: int,
    table: PreferenceTable | None = None,
) -> str | None:
    """The member that owns ``bucket`` of a group (``members``, each at ``slots[m]``) when
    ``live`` are live: what the agent programs (see :func:`targets`); None if none is."""
    tbl = table or default_table()
    if not 0 <= bucket < tbl.buckets:
        raise ValueError(f"bucket {bucket} is outside 0..{tbl.buckets - 1}")
    slot = int(tbl.owners(live_slots(slots, members, live))[bucket])  # as Assignment.owner
    return None if slot == NO_OWNER else next(m for m in members if slots[m] == slot)


def ownership(cfg: Config, live: Iterable[str]) -> dict[str, GroupOwnership]:
    """Per group: the assignment for the live members of that group."""
    live_set = frozenset(live)
    table = cfg.table
    out: dict[str, GroupOwnership] = {}
    for g in cfg.groups:
        members = tuple(m for m in g.members if m in live_set)
        out[g.name] = GroupOwnership(
            g.name, members, assign(group_live_slots(cfg, g.name, live_set), table)
        )
    return out


def targets(cfg: Config, node: str, live: Iterable[str]) -> dict[str, frozenset[int]]:
    """Per group: the buckets ``node`` owns when ``live`` are the live members."""
    slot = cfg.slots[node]
    own = ownership(cfg, live)
    return {
        name: (o.assignment.buckets(slot) if node in o.live else frozenset())
        for name, o in own.items()
    }


def release_step(
    current: Mapping[str, frozenset[int]], target: Mapping[str, frozenset[int]]
) -> dict[str, frozenset[int]]:
    """Phase 1 of a manual change: keep only what stays ours (nothing new is taken)."""
    return {g: current.get(g, frozenset()) & t for g, t in target.items()}
