"""Connection-preserving handover of buckets between live members.  Pure.

Owns, per traffic IP group, this node's three bucket sets and their life cycle:

* ``owned``    — served normally;
* ``draining`` — given away, but this node still has established flows there: the kernel
  accepts only ``ct state established,related`` for them;
* ``incoming`` — taken from a member that is still alive (it drains them): the kernel
  accepts established/related flows *of this node* and new flows (a pure SYN for TCP),
  and drops the old owner's mid-stream packets instead of answering them with resets.

Rules (see docs/handover.md): a bucket this node loses goes to ``draining`` (never to
nobody at once); a bucket it gains from a member that is alive goes to ``incoming``; from a
member that is dead (crashed: its flows are gone with it) straight to ``owned``, so the
crashed member's clients get resets quickly instead of hanging.  ``draining`` buckets leave
when conntrack shows no flow of this node in them any more, or after ``max_drain``;
``incoming`` buckets become ``owned`` when the old owner reports it has nothing left
draining, or after ``max_drain``.  A bucket is in at most one set.

Must not: read conntrack, talk to the kernel or know about heartbeats — callers pass in
what they observed and the current time, and apply :meth:`Handover.state`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field


@dataclass
class GroupSets:
    owned: set[int] = field(default_factory=set)
    draining: dict[int, float] = field(default_factory=dict)  # bucket -> since
    incoming: dict[int, tuple[str | None, float]] = field(default_factory=dict)  # -> (from, since)


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
        previous_owner: Callable[[int], str | None],
        alive: Callable[[str], bool],
        now: float,
    ) -> None:
        """This node should now serve ``target``; ``previous_owner(b)`` names who served b."""
        g = self.groups[group]
        lost = g.owned - target
        g.owned -= lost
        if self.enabled:  # lost: keep our established flows
            g.draining.update(dict.fromkeys(lost, now))
        for b in [b for b in g.incoming if b not in target]:  # gained, then lost again
            del g.incoming[b]
        # A bucket coming back before it finished draining was served by another member
        # meanwhile (it has flows there now): it comes back like any gained bucket, and
        # 'incoming' still accepts our own old flows (they are established here).
        for b in target & g.draining.keys():
            del g.draining[b]
        for b in target - g.owned - g.incoming.keys():  # gained
            prev = previous_owner(b)
            if self.enabled and prev is not None and alive(prev):
                g.incoming[b] = (prev, now)
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

    def promote(self, group: str, finished: Callable[[str | None], bool], now: float) -> int:
        """Incoming buckets whose old owner ``finished`` draining (or timed out) -> owned."""
        g = self.groups[group]
        done = [
            b
            for b, (src, since) in g.incoming.items()
            if finished(src) or now - since >= self.max_drain
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
        times += [s for g in self.groups.values() for _, s in g.incoming.values()]
        return min(times) + self.max_drain if times else None

    def all_snapshots(self) -> Mapping[str, Snapshot]:
        return {name: self.snapshot(name) for name in self.groups}
