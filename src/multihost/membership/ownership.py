"""Bucket masks for the membership core: shares of slots under live sets, per group.

Owns: :class:`GroupLayout` (a traffic IP group's index, member names and slots, derived from
the configuration), :func:`share_mask` (the read-only boolean mask of the buckets a slot
owns under a live set of slots in the cluster's table, cached), :func:`claim_mask` (a share
minus what peers advertise) and :func:`claims_bound` (the live-set mask whose shares cover
given claims).  Ownership itself is the table's (:mod:`multihost.assignment`, chosen by
:mod:`multihost.tablechoice`); this module only shapes it.  Slot masks have
:data:`~multihost.membership.wire.SLOTS` (16) bits.

Must not: keep protocol state, read clocks, or know the wire format.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from multihost.assignment import PreferenceTable
from multihost.membership.wire import ALL_SLOTS, SLOTS

BoolArray = npt.NDArray[np.bool_]


def _readonly(arr: BoolArray) -> BoolArray:
    arr.setflags(write=False)
    return arr


@functools.cache
def empty(buckets: int) -> BoolArray:
    """The read-only mask of no bucket, for a table of ``buckets`` buckets."""
    return _readonly(np.zeros(buckets, dtype=bool))


#: Bytes of share masks kept (least recently used first out): 512 masks of the 8-slot table
#: (40,320 buckets), 46 of the 16-slot one (720,720).
SHARE_CACHE_BYTES: Final = 512 * 65_536
_shares: OrderedDict[tuple[PreferenceTable, frozenset[int], int], BoolArray] = OrderedDict()


def share_mask(table: PreferenceTable, live: frozenset[int], slot: int) -> BoolArray:
    """Buckets ``slot`` owns in ``table`` when exactly ``live`` slots are live (empty if not
    live).  Cached within :data:`SHARE_CACHE_BYTES`."""
    if slot not in live:
        return empty(table.buckets)
    key = (table, live, slot)
    mask = _shares.get(key)
    if mask is not None:
        _shares.move_to_end(key)
        return mask
    mask = _readonly(np.asarray(table.owners(live) == slot, dtype=bool))
    _shares[key] = mask
    while len(_shares) > max(16, SHARE_CACHE_BYTES // table.buckets):
        _shares.popitem(last=False)
    return mask


def mask_of(slots: Iterable[int]) -> int:
    out = 0
    for s in slots:
        out |= 1 << s
    return out


@functools.lru_cache(maxsize=4096)
def slots_in(mask: int) -> frozenset[int]:
    """The slots (0..15) of a slot mask (cached: heartbeats carry masks, per input)."""
    mask &= ALL_SLOTS
    return frozenset(s for s in range(SLOTS) if mask >> s & 1)


@dataclass(frozen=True)
class GroupLayout:
    """One traffic IP group: ``index`` is its bit in heartbeats (sorted-name order)."""

    name: str
    index: int
    members: frozenset[str]
    slots: frozenset[int]
    slot_mask: int


def layout_groups(
    groups: Mapping[str, frozenset[str]], members: Mapping[str, int]
) -> tuple[GroupLayout, ...]:
    out = []
    for index, name in enumerate(sorted(groups)):
        names = frozenset(groups[name])
        slots = frozenset(members[n] for n in names)
        out.append(GroupLayout(name, index, names, slots, mask_of(slots)))
    return tuple(out)


def claim_mask(
    table: PreferenceTable,
    slot: int,
    live: frozenset[int],
    adverts: Iterable[tuple[int, frozenset[int]]],
    keep_only: BoolArray | None = None,
) -> BoolArray:
    """``slot``'s share under ``live``, minus each peer's share under the live set it
    advertises (``(peer slot, live)`` pairs), intersected with ``keep_only`` if given."""
    mask = share_mask(table, live, slot)
    adverts = tuple(adverts)
    if not adverts and keep_only is None:
        return mask
    mask = mask.copy()
    for peer, their_live in adverts:
        mask &= ~share_mask(table, their_live, peer)
    if keep_only is not None:
        mask &= keep_only
    return _readonly(mask)


def claims_bound(held: Iterable[tuple[GroupLayout, frozenset[int]]]) -> tuple[int, int]:
    """(held-groups bitmap, live-set mask) for claims that, in each held group, lie in our
    share under that group's live set: the mask keeps, inside each held group, only its
    live slots, so our share under it (restricted to the group) covers the claims."""
    groups, live = 0, ALL_SLOTS
    for g, live_g in held:
        groups |= 1 << g.index
        live &= mask_of(live_g) | (ALL_SLOTS & ~g.slot_mask)
    return groups, live
