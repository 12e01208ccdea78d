"""Connection-preserving handover of buckets between live members.  Pure.

Owns, per traffic IP group, this node's three bucket sets and their life cycle:

* ``owned``    — served normally;
* ``draining`` — given away, but this node still has established flows there: the kernel
  accepts only ``ct state established,related`` for them;
* ``incoming`` — taken from a member that is still alive (it drains them): the kernel
  accepts established/related flows *of this node* and new flows (a pure SYN for TCP),
  and drops the old owner's mid-stream packets instead of answering them with resets.

Rules (see docs/handover.md): a bucket this node stops claiming (from ``owned`` or
``incoming``: it may have accepted new flows there) goes to ``draining``, never to nobody at
once.  A bucket it starts claiming goes to ``incoming`` while any *other* live member may
still hold flows in given-away buckets (it advertises a draining flag), else straight to
``owned`` — after a crash with nobody draining, the crashed member's clients get resets
quickly instead of hanging.  ``draining`` buckets leave when conntrack shows no flow of
this node in them any more, or after ``max_drain``; ``incoming`` buckets become ``owned``
when no other live member advertises draining any more, or after ``max_drain``.  A bucket
is in at most one set.

Why one cluster-wide flag and not "the previous owner": ownership can pass through several
members while one of them still drains (D drains to A, A crashes, C takes A's share), and
a node that just (re)joined does not know who served a bucket before.  The flag is exact
about the only thing that matters — whether anybody else may still have flows to protect —
and costs one bit per heartbeat.  Its price: while a member drains for long, the others
keep new buckets in ``incoming`` (they drop, rather than reset, stray mid-stream packets).

Must not: read conntrack, talk to the kernel or know about heartbeats — callers pass in
what they observed and the current time, and apply :meth:`Handover.state`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass
class GroupSets:
    owned: set[int] = field(default_factory=set)
    draining: dict[int, float] = field(default_factory=dict)  # bucket -> since
    incoming: dict[int, float] = field(default_factory=dict)  # bucket -> since


@dataclass(frozen=True)
class Snapshot:
    owned: frozenset[int]
    draining: frozenset[int]
    incoming: frozenset[int]


class Handover:
    def __init__(self, groups: Iterable[str], max_drain: float, enabled: bool = True) -> None:
        self.max_drain = max_drain
        self.enabled = enabled
        self.groups: dict[str, GroupSets] = {g: GroupSets() for g in groups}

    # --------------------------------------------------------------- transitions
    def retarget(
        self,
        group: str,
        target: frozenset[int],
        others_draining: bool,
        now: float,
        *,
        reclassify: bool = False,
    ) -> None:
        """This node should now take new flows in ``target``; ``others_draining``: another
        live member may still have flows in buckets it gave away.  ``reclassify``: this node
        took no new flows for a while (its lease lapsed) and others may have served its
        buckets meanwhile: kept ``owned`` buckets count as gained again."""
        g = self.groups[group]
        if reclassify and self.enabled and others_draining:
            kept = g.owned & target
            g.owned -= kept
            g.incoming.update(dict.fromkeys(kept, now))
        lost = (g.owned | g.incoming.keys()) - target
        g.owned -= lost
        for b in lost & g.incoming.keys():
            del g.incoming[b]
        if self.enabled:  # lost: keep our established flows (incoming ones may have some)
            g.draining.update(dict.fromkeys(lost, now))
        # A bucket coming back before it finished draining: another member may have served
        # it meanwhile; 'incoming' and 'owned' both accept our own established flows.
        for b in target - g.owned - g.incoming.keys():  # gained
            g.draining.pop(b, None)
            if self.enabled and others_draining:
                g.incoming[b] = now
            else:
                g.owned.add(b)

    def drained(self, group: str, in_use: frozenset[int] | set[int], now: float) -> int:
        """Drop draining buckets with no flow left (or past ``max_drain``); returns how many."""
        g = self.groups[group]
        done = [
            b for b, since in g.draining.items() if b not in in_use or now - since >= self.max_drain
        ]
        for b in done:
            del g.draining[b]
        return len(done)

    def promote(self, group: str, others_draining: bool, now: float) -> int:
        """Incoming buckets -> owned once no other member drains (or after ``max_drain``)."""
        g = self.groups[group]
        done = [
            b
            for b, since in g.incoming.items()
            if not others_draining or now - since >= self.max_drain
        ]
        for b in done:
            del g.incoming[b]
            g.owned.add(b)
        return len(done)

    def release_all(self, group: str) -> None:
        """Forget everything (clean stop or fencing): the kernel serves nothing."""
        self.groups[group] = GroupSets()

    # ------------------------------------------------------------------- queries
    def snapshot(self, group: str) -> Snapshot:
        g = self.groups[group]
        return Snapshot(frozenset(g.owned), frozenset(g.draining), frozenset(g.incoming))

    def serving(self, group: str) -> frozenset[int]:
        """Buckets this node accepts any packet of (owned + incoming + draining)."""
        g = self.groups[group]
        return frozenset(g.owned) | frozenset(g.draining) | frozenset(g.incoming)

    def claims(self, group: str) -> frozenset[int]:
        """Buckets this node takes new flows in (owned + incoming)."""
        g = self.groups[group]
        return frozenset(g.owned) | frozenset(g.incoming)

    def draining_count(self) -> int:
        return sum(len(g.draining) for g in self.groups.values())

    def next_deadline(self) -> float | None:
        times = [s for g in self.groups.values() for s in g.draining.values()]
        times += [s for g in self.groups.values() for s in g.incoming.values()]
        return min(times) + self.max_drain if times else None

    def all_snapshots(self) -> Mapping[str, Snapshot]:
        return {name: self.snapshot(name) for name in self.groups}
