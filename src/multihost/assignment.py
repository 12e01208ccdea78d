"""Bucket ownership: which member slot owns which bucket of the flow-hash space.

Owns the preference tables (for each bucket, a fixed ordering of the member slots), and
everything derived from a *live set* of slots: the owner of every bucket, each slot's exact
share, its buckets as a set and as merged ``[lo, hi]`` ranges, and the transfers between
two live sets.  A bucket belongs to the first live slot of its ordering.

Must not: know member names, configuration files, clocks, sockets or nftables.  It is pure
and deterministic; the result depends only on the table and the live set (no history).

Choice of table
---------------
The default is :func:`factorial_table`: all ``8! = 40320`` orderings of the 8 slots, in
lexicographic order, one bucket each (``B = 40320``).  Why this table:

* **Exactness by symmetry.**  For a live set ``L`` every live slot is the first live slot of
  exactly ``B/|L|`` orderings (every ordering occurs once, and ``lcm(1..8) = 840`` divides
  ``40320``).  When slot ``s`` fails, a bucket it owned falls to the next live slot of its
  ordering, which by symmetry is each survivor equally often; no other bucket can change,
  because the first live slot of an ordering not led by ``s`` is unaffected.  Recovery is the
  inverse transition.  The tests check all 255 live subsets and all 1,024 single-member
  transitions exhaustively.
* **Readable ownership while healthy.**  Lexicographic order gives each member one
  contiguous range when all slots are live (bucket ``b`` starts with slot ``b // 7!``).  The
  ranges fragment as members die (up to ~2,000 ranges with 2 of 8 live), but the data plane
  keeps owned buckets in a kernel *bitmap* set whose per-packet cost does not depend on
  fragmentation, so the fragmentation costs nothing per packet.
* **No solver, no opaque constants.**  The 840-ordering minimal min-wise independent family
  (Takei, Itoh, Shinozaki 2000) would need an integer program to find and a shipped constant
  table to audit; its advantage (fewer buckets) buys nothing with a bitmap set, whose 16-bit
  key holds 40,320 buckets; its ranges are fragmented from the start.
* **Fine granularity.**  40,320 buckets make the hash space effectively continuous for
  traffic shares; ``reciprocal_scale`` maps the 32-bit jhash to buckets with a relative bias
  below 1e-5.

Groups with fewer than 8 members leave the other slots permanently dead, so a member added
later takes exactly its new share and nothing else moves.

The table is a replaceable part: anything implementing :class:`PreferenceTable` works,
and :class:`OrderingTable` accepts any explicit ``(B, S)`` array of orderings (for
example the 840 family, or a larger table when groups grow beyond 8 members).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

import numpy as np
import numpy.typing as npt

MAX_SLOTS = 8
NO_OWNER = -1

OwnerArray = npt.NDArray[np.int8]


class AssignmentError(ValueError):
    """A live set or table that the engine cannot use (names the offending value)."""


class PreferenceTable(Protocol):
    """Anything that maps a live set of slots to the owner of every bucket."""

    @property
    def slots(self) -> int:
        """Number of member slots (live sets are subsets of ``range(slots)``)."""
        ...

    @property
    def buckets(self) -> int:
        """Number of buckets ``B`` in the hash space."""
        ...

    def owners(self, live: frozenset[int]) -> OwnerArray:
        """Owner slot of every bucket (``NO_OWNER`` when ``live`` is empty); read-only."""
        ...

    def __hash__(self) -> int:
        """Tables are hashable (by identity): caches are keyed by them."""
        ...


class OrderingTable:
    """A preference table given explicitly: row ``b`` is bucket ``b``'s ordering of slots."""

    def __init__(self, orderings: npt.ArrayLike, name: str = "custom") -> None:
        arr = np.array(orderings, dtype=np.int8)
        if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise AssignmentError(f"orderings must be a non-empty 2-D array, got {arr.shape}")
        if not is_permutation_rows(arr):
            raise AssignmentError("every row must be a permutation of range(slots)")
        arr.setflags(write=False)
        self._orderings = arr
        # Column-major copy: the owner computation walks one preference rank at a time.
        self._columns = np.ascontiguousarray(arr.T)
        self.name = name
        # One cached owner array per live set: 255 sets x 40 KB at most.
        self._owners_cached = functools.lru_cache(maxsize=None)(self._compute_owners)

    @property
    def slots(self) -> int:
        return int(self._orderings.shape[1])

    @property
    def buckets(self) -> int:
        return int(self._orderings.shape[0])

    @property
    def orderings(self) -> npt.NDArray[np.int8]:
        return self._orderings

    def owners(self, live: frozenset[int]) -> OwnerArray:
        check_live(live, self.slots)
        result: OwnerArray = self._owners_cached(live)
        return result

    def _compute_owners(self, live: frozenset[int]) -> OwnerArray:
        out = np.full(self.buckets, NO_OWNER, dtype=np.int8)
        if live:
            mask = np.zeros(self.slots, dtype=bool)
            mask[sorted(live)] = True
            open_ = np.ones(self.buckets, dtype=bool)  # buckets still without an owner
            for column in self._columns:  # rank 0, 1, ...: first live slot wins
                take = open_ & mask[column]
                out[take] = column[take]
                open_ &= ~take
                if not open_.any():
                    break
        out.setflags(write=False)
        return out


def permutation_rows(arr: npt.NDArray[np.integer]) -> npt.NDArray[np.bool_]:
    """Per row of a 2-D array of ``n`` columns: is it a permutation of ``range(n)``?  (Values
    in range, and the OR of ``1 << value`` over the row has all ``n`` bits: ``n`` values
    covering ``n`` bits are distinct.)  O(rows x n), no sort."""
    n = arr.shape[1]
    if n > 62:  # the bits would not fit an int64: fall back to sorting
        return np.asarray(np.all(np.sort(arr, axis=1) == np.arange(n), axis=1))
    ok = np.ones(arr.shape[0], dtype=bool)
    bits = np.zeros(arr.shape[0], dtype=np.int64)
    for column in np.asarray(arr).T:  # n passes over contiguous columns
        col = column.astype(np.int64)
        inside = (col >= 0) & (col < n)
        ok &= inside
        bits |= np.left_shift(1, np.where(inside, col, 0))
    return np.asarray(ok & (bits == (1 << n) - 1))


def is_permutation_rows(arr: npt.NDArray[np.integer]) -> bool:
    return bool(np.all(permutation_rows(arr)))


def check_live(live: Iterable[int], slots: int) -> None:
    """Raise :class:`AssignmentError` naming the first slot outside ``range(slots)``."""
    for s in live:
        if not isinstance(s, int) or not 0 <= s < slots:
            raise AssignmentError(f"slot {s!r} is outside 0..{slots - 1}")


@functools.cache
def factorial_table(slots: int = MAX_SLOTS) -> OrderingTable:
    """All ``slots!`` orderings in lexicographic order (the default table; see module doc)."""
    if not 1 <= slots <= MAX_SLOTS:
        raise AssignmentError(f"factorial table supports 1..{MAX_SLOTS} slots, got {slots}")
    perms = np.array(list(itertools.permutations(range(slots))), dtype=np.int8)
    return OrderingTable(perms, name=f"factorial-{slots}")


def default_table() -> OrderingTable:
    return factorial_table(MAX_SLOTS)


def merge_ranges(buckets: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """Sorted, merged inclusive ``(lo, hi)`` ranges covering exactly ``buckets``."""
    arr = np.unique(np.fromiter(buckets, dtype=np.int64))
    if arr.size == 0:
        return ()
    breaks = np.flatnonzero(np.diff(arr) != 1)
    starts = np.concatenate(([arr[0]], arr[breaks + 1]))
    ends = np.concatenate((arr[breaks], [arr[-1]]))
    return tuple((int(lo), int(hi)) for lo, hi in zip(starts, ends, strict=True))


@dataclass(frozen=True, order=True)
class Transfer:
    """``buckets`` buckets move from slot ``source`` to slot ``target`` (None: no owner)."""

    source: int | None
    target: int | None
    buckets: int


class Assignment:
    """Ownership of the whole hash space for one live set.  Immutable."""

    def __init__(self, table: PreferenceTable, live: Iterable[int]) -> None:
        self.table = table
        self.live: frozenset[int] = frozenset(live)
        self.owners: OwnerArray = table.owners(self.live)
        self._counts = np.bincount(self.owners[self.owners >= 0], minlength=table.slots)
        self._ranges: dict[int, tuple[tuple[int, int], ...]] | None = None

    @property
    def buckets_total(self) -> int:
        return self.table.buckets

    def owner(self, bucket: int) -> int | None:
        if not 0 <= bucket < self.table.buckets:
            raise AssignmentError(f"bucket {bucket} is outside 0..{self.table.buckets - 1}")
        o = int(self.owners[bucket])
        return None if o == NO_OWNER else o

    def count(self, slot: int) -> int:
        check_live((slot,), self.table.slots)
        return int(self._counts[slot])

    def share(self, slot: int) -> Fraction:
        """Exact fraction of the hash space owned by ``slot``."""
        return Fraction(self.count(slot), self.table.buckets)

    def shares(self) -> dict[int, Fraction]:
        return {s: self.share(s) for s in sorted(self.live)}

    def bucket_array(self, slot: int) -> npt.NDArray[np.int64]:
        """Owned buckets of ``slot``, ascending, as an int64 array."""
        check_live((slot,), self.table.slots)
        return np.flatnonzero(self.owners == slot)

    def buckets(self, slot: int) -> frozenset[int]:
        return frozenset(int(b) for b in self.bucket_array(slot))

    def ranges(self, slot: int) -> tuple[tuple[int, int], ...]:
        """Sorted, merged inclusive ``(lo, hi)`` ranges owned by ``slot``."""
        check_live((slot,), self.table.slots)
        if self._ranges is None:
            self._ranges = self._all_ranges()
        return self._ranges.get(slot, ())

    def _all_ranges(self) -> dict[int, tuple[tuple[int, int], ...]]:
        own = self.owners
        cuts = np.flatnonzero(own[1:] != own[:-1]) + 1
        starts = np.concatenate(([0], cuts))
        ends = np.concatenate((cuts, [own.size])) - 1
        slots = own[starts]
        return {
            int(s): tuple(zip(starts[slots == s].tolist(), ends[slots == s].tolist(), strict=True))
            for s in np.unique(slots)
            if s != NO_OWNER
        }


def assign(live: Iterable[int], table: PreferenceTable | None = None) -> Assignment:
    """Ownership for ``live`` slots under ``table`` (default: :func:`default_table`)."""
    return Assignment(table if table is not None else default_table(), live)


def moved_buckets(before: Assignment, after: Assignment) -> int:
    """Number of buckets whose owner differs between two assignments of the same table."""
    _same_table(before, after)
    return int(np.count_nonzero(before.owners != after.owners))


def transfers(before: Assignment, after: Assignment) -> list[Transfer]:
    """Bucket movements from ``before`` to ``after``, sorted by (source, target)."""
    _same_table(before, after)
    changed = before.owners != after.owners
    if not changed.any():
        return []
    n = before.table.slots + 1  # +1 encodes NO_OWNER as n-1
    src = np.where(before.owners[changed] < 0, n - 1, before.owners[changed]).astype(np.int64)
    dst = np.where(after.owners[changed] < 0, n - 1, after.owners[changed]).astype(np.int64)
    counts = np.bincount(src * n + dst, minlength=n * n)
    out: list[Transfer] = []
    for code in np.flatnonzero(counts).tolist():
        s, d = divmod(code, n)
        out.append(
            Transfer(None if s == n - 1 else s, None if d == n - 1 else d, int(counts[code]))
        )
    return sorted(out, key=lambda t: (_key(t.source), _key(t.target)))


def _key(slot: int | None) -> int:
    return -1 if slot is None else slot


def _same_table(a: Assignment, b: Assignment) -> None:
    if a.table is not b.table:
        raise AssignmentError("cannot compare assignments made with different tables")


def slots_of(names: Sequence[str], members: Sequence[str]) -> frozenset[int]:
    """Slots of ``names`` where a member's slot is its position in ``members``."""
    index = {m: i for i, m in enumerate(members)}
    missing = [n for n in names if n not in index]
    if missing:
        raise AssignmentError(f"unknown member {missing[0]!r} (members: {', '.join(members)})")
    return frozenset(index[n] for n in names)
