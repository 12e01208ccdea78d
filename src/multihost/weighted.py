"""Weighted members: a node of weight ``k`` holds ``k`` virtual slots of a preference table.

Owns: :class:`WeightedTable`, a :class:`~multihost.assignment.PreferenceTable` over *node*
slots built on a base table over *virtual* slots, and :func:`virtual_slots` (which virtual
slots each node holds: nodes in ascending slot order, consecutive virtual slots, as many as
its weight).  A bucket belongs to the node holding the first live virtual slot of the
bucket's ordering; a node's virtual slots are live exactly when the node is.

Why it is exact (``docs/tables.md``, "Weights"): the base table is exactly min-wise over
its ``V`` virtual slots, so under any live set of nodes whose weights add up to ``W``, each
live virtual slot owns exactly ``B/W`` buckets and a node of weight ``k`` owns ``k·B/W``.
When a node fails, all its virtual slots fail together; an ordering whose first live
virtual slot belongs to another node keeps that slot (first-live semantics), so only the
failed node's buckets move, and recovery moves exactly those back.

Must not: know configuration files, member names, the kernel or the network.  Pure.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import numpy as np

from multihost.assignment import NO_OWNER, AssignmentError, OwnerArray, PreferenceTable, check_live


def virtual_slots(weights: Iterable[tuple[int, int]]) -> dict[int, tuple[int, ...]]:
    """``(node slot, weight)`` pairs -> node slot -> its virtual slots (ascending node slot
    order, consecutive).  Raises :class:`AssignmentError` for a weight below 1 or a slot
    given twice."""
    out: dict[int, tuple[int, ...]] = {}
    at = 0
    for slot, weight in sorted(weights):
        if slot in out:
            raise AssignmentError(f"slot {slot} is given twice")
        if not isinstance(weight, int) or weight < 1:
            raise AssignmentError(f"slot {slot}: weight {weight!r} must be an integer >= 1")
        out[slot] = tuple(range(at, at + weight))
        at += weight
    return out


class WeightedTable:
    """Node-slot ownership from a base table over virtual slots (see the module doc)."""

    def __init__(
        self,
        base: PreferenceTable,
        virtual: Mapping[int, tuple[int, ...]],
        *,
        base_name: str = "table",
        cache_size: int = 256,
    ) -> None:
        used = [v for vs in virtual.values() for v in vs]
        if sorted(used) != list(range(len(used))) or len(used) > base.slots:
            raise AssignmentError(
                f"virtual slots {sorted(used)} must be 0..{len(used) - 1} within the base"
                f" table's {base.slots} slots"
            )
        self.base = base
        self.virtual: dict[int, tuple[int, ...]] = dict(sorted(virtual.items()))
        self.weights: dict[int, int] = {s: len(v) for s, v in self.virtual.items()}
        self._slots = max(self.virtual) + 1
        node_of = np.full(base.slots, NO_OWNER, dtype=np.int8)
        for slot, vs in self.virtual.items():
            node_of[list(vs)] = slot
        self._node_of = node_of
        spec = ",".join(f"{s}:{w}" for s, w in self.weights.items())
        self.name = f"{base_name}/weights-{spec}"
        self._owners_cached = functools.lru_cache(maxsize=cache_size)(self._compute)

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def buckets(self) -> int:
        return self.base.buckets

    @property
    def virtual_count(self) -> int:
        return sum(self.weights.values())

    def weight(self, slot: int) -> int:
        """The weight of node ``slot`` (0 for a slot no node holds)."""
        return self.weights.get(slot, 0)

    def owners(self, live: frozenset[int]) -> OwnerArray:
        check_live(live, self.slots)
        result: OwnerArray = self._owners_cached(frozenset(live))
        return result

    def _compute(self, live: frozenset[int]) -> OwnerArray:
        vlive = frozenset(v for s in live for v in self.virtual.get(s, ()))
        own = self.base.owners(vlive)
        out = np.where(own >= 0, self._node_of[np.maximum(own, 0)], NO_OWNER).astype(np.int8)
        out.setflags(write=False)
        return out
