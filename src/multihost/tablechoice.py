"""Which preference table a cluster uses, and what each data plane can hold.

Owns: the table of a configuration, chosen by its slot count ``n = max([[node]].slot) + 1``
(:func:`table_for`), the table's identity (name, slots, buckets, sha256 of its orderings:
it goes into the configuration digest, so nodes with different tables refuse each other),
and the per-backend limits (:func:`backend_problem`).

Every group of a cluster is assigned over the slots of its members in the one cluster
table; the other slots are permanently dead.  That is exact for every group: an exactly
min-wise table is balanced for *every* live subset of its slots, a group's included.  So
node ``slot`` *is* the table slot (and the heartbeat mask bit): no remapping.

The choice (``[cluster] table``, one of :data:`TABLE_KINDS`): ``"factorial"`` (the default)
keeps, for ``n <= 8``, the factorial table (all ``8!`` orderings, 40,320 buckets: the table
of every release before tables of other sizes existed, so a rolling upgrade keeps the bucket
space); ``"minimal"`` uses, for ``n <= 8`` too, the smallest exact table, the shipped exactly
min-wise family of ``lcm(1..n)`` orderings (:mod:`multihost.minwise`): 12 buckets for 4
slots, 840 for 8, so the data planes hold a few dozen ranges rather than thousands.  For
``n = 9..16`` both kinds use that family.  One bucket per ordering (no replication: shares
are exact fractions of the hash space whatever the bucket count, so copies would only add
elements).

Weights (:mod:`multihost.weighted`): when some ``[[node]].weight`` is not 1, node ``slot``
holds ``weight`` consecutive *virtual* slots (nodes in ascending slot order), and the table
is chosen by the virtual slot count ``V = sum of weights`` exactly as above (``V <= 8``:
factorial-8, else min-wise ``lcm(1..V)``), wrapped in a :class:`WeightedTable`.  With every
weight 1 nothing changes (node slot = table slot).

Limits: nft keeps owned buckets in a bitmap set with a 16-bit key, so at most 65,536
buckets, i.e. ``n <= 12`` (27,720).  XDP arrays take up to ``MAX_BUCKETS`` (2**20), so
``n <= 16`` (720,720).

Must not: parse configuration, touch the kernel or the network.  Pure apart from loading
the checksum-verified package data of :mod:`multihost.minwise`.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np

from multihost import minwise
from multihost.assignment import MAX_SLOTS as FACTORIAL_SLOTS
from multihost.assignment import OrderingTable, PreferenceTable, factorial_table
from multihost.weighted import WeightedTable, virtual_slots

MAX_TABLE_SLOTS = 16  # the largest shipped min-wise family
TABLE_KINDS = ("factorial", "minimal")  # [cluster] table; the first is the default
NFT_MAX_BUCKETS = 1 << 16  # nft bitmap set: 16-bit key
NFT_MAX_SLOTS = 12  # lcm(1..12) = 27,720 <= 65,536 < lcm(1..13) = 360,360
XDP_MAX_SLOTS = 16  # lcm(1..16) = 720,720 <= xdplayout.MAX_BUCKETS
BACKEND_MAX_SLOTS = {"nft": NFT_MAX_SLOTS, "xdp": XDP_MAX_SLOTS}


class TableChoiceError(ValueError):
    """No table for this slot count (names the count and the limit)."""


@dataclass(frozen=True)
class TableIdentity:
    """What two nodes must agree on: the same orderings, bucket for bucket."""

    name: str
    slots: int
    buckets: int
    sha256: str

    def as_dict(self) -> dict[str, str | int]:
        return {
            "name": self.name,
            "slots": self.slots,
            "buckets": self.buckets,
            "sha256": self.sha256,
        }


def _kind(kind: str) -> str:
    if kind not in TABLE_KINDS:
        raise TableChoiceError(f"table {kind!r} is not one of {', '.join(TABLE_KINDS)}")
    return kind


def table_slots(slots: int, kind: str = "factorial") -> int:
    """The slot count of the table for a cluster whose highest slot is ``slots - 1``."""
    if not 1 <= slots <= MAX_TABLE_SLOTS:
        raise TableChoiceError(f"{slots} slots: tables exist for 1..{MAX_TABLE_SLOTS}")
    if _kind(kind) == "minimal":
        return slots
    return FACTORIAL_SLOTS if slots <= FACTORIAL_SLOTS else slots


@functools.cache
def table_for(slots: int, kind: str = "factorial") -> OrderingTable:
    """The cluster table of ``kind`` for ``slots`` slots (see the module doc for the choice)."""
    n = table_slots(slots, kind)
    if kind == "factorial" and n <= FACTORIAL_SLOTS:
        return factorial_table(n)
    return minwise.minwise_table(n)


@functools.cache
def weighted_table(weights: tuple[tuple[int, int], ...], kind: str = "factorial") -> WeightedTable:
    """The cluster table for nodes given as ``(slot, weight)`` pairs: the table of
    ``sum(weights)`` virtual slots, each node holding ``weight`` of them."""
    virtual = virtual_slots(weights)
    total = sum(len(v) for v in virtual.values())
    base = table_for(total, kind)
    return WeightedTable(base, virtual, base_name=base.name)


def cluster_table(weights: tuple[tuple[int, int], ...], kind: str = "factorial") -> PreferenceTable:
    """The ``kind`` table of a cluster whose nodes are ``(slot, weight)``: unweighted (every
    weight 1) the table of ``max(slot) + 1`` slots, else :func:`weighted_table`."""
    if all(w == 1 for _, w in weights):
        return table_for(max(s for s, _ in weights) + 1, kind)
    return weighted_table(tuple(sorted(weights)), kind)


def table_size_slots(weights: tuple[tuple[int, int], ...]) -> int:
    """The slot count the table is chosen by (what the backend limits apply to): the
    highest slot + 1 without weights, the sum of the weights with them."""
    if all(w == 1 for _, w in weights):
        return max(s for s, _ in weights) + 1
    return sum(w for _, w in weights)


@functools.cache
def identity(slots: int) -> TableIdentity:
    """Name, slot count, bucket count and sha256 of the orderings of :func:`table_for`."""
    return table_identity(table_for(slots))


@functools.cache
def table_identity(t: PreferenceTable) -> TableIdentity:
    """The identity of a cluster table (a weighted one: its base's orderings and the
    virtual slots of every node)."""
    if isinstance(t, WeightedTable):
        base = table_identity(t.base)
        h = hashlib.sha256(bytes.fromhex(base.sha256))
        h.update(repr(sorted(t.virtual.items())).encode())
        return TableIdentity(t.name, t.slots, t.buckets, h.hexdigest())
    if not isinstance(t, OrderingTable):
        raise TypeError(f"no identity for table {t!r}")
    digest = hashlib.sha256(np.ascontiguousarray(t.orderings, dtype=np.int8).tobytes())
    return TableIdentity(t.name, t.slots, t.buckets, digest.hexdigest())


def backend_problem(slots: int, backend: str) -> str | None:
    """Why ``backend`` cannot hold the table for ``slots`` slots (None: it can)."""
    limit = BACKEND_MAX_SLOTS.get(backend, MAX_TABLE_SLOTS)
    if slots <= limit:
        return None
    buckets = minwise.lcm_upto(slots)
    if backend == "nft":
        return (
            f"{slots} slots need a table of lcm(1..{slots}) = {buckets:,} buckets; the nft "
            f"bitmap set holds at most {NFT_MAX_BUCKETS:,}, so at most {NFT_MAX_SLOTS} slots "
            f'(use dataplane = "xdp" for up to {XDP_MAX_SLOTS})'
        )
    return f"{slots} slots: the {backend} data plane takes at most {limit} slots"
