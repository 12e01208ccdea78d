"""Exhaustive and property tests of the assignment engine's exact guarantees."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multihost.assignment import (
    NO_OWNER,
    AssignmentError,
    OrderingTable,
    Transfer,
    assign,
    default_table,
    factorial_table,
    merge_ranges,
    moved_buckets,
    transfers,
)

TABLE = default_table()
B = TABLE.buckets
SUBSETS = [frozenset(c) for r in range(1, 9) for c in itertools.combinations(range(8), r)]


def test_table_shape() -> None:
    assert B == 40320
    assert TABLE.slots == 8
    assert len(SUBSETS) == 255


@pytest.mark.parametrize("live", SUBSETS, ids=lambda s: "".join(map(str, sorted(s))))
def test_every_live_subset_is_exactly_balanced(live: frozenset[int]) -> None:
    a = assign(live)
    counts = np.bincount(a.owners, minlength=8)
    for s in range(8):
        expected = B // len(live) if s in live else 0
        assert counts[s] == expected, (sorted(live), s)
        assert a.share(s) == (Fraction(1, len(live)) if s in live else 0)
    # sets, ranges and the owner array agree
    for s in live:
        ranges = a.ranges(s)
        from_ranges = {b for lo, hi in ranges for b in range(lo, hi + 1)}
        assert from_ranges == a.buckets(s)
        assert all(ranges[i][1] + 1 < ranges[i + 1][0] for i in range(len(ranges) - 1))


def test_all_single_member_transitions_move_only_that_members_share() -> None:
    checked = 0
    for live in SUBSETS:
        before = assign(live)
        for s in range(8):
            after_live = live - {s} if s in live else live | {s}
            after = assign(after_live)
            changed = before.owners != after.owners
            if s in live:  # failure of s
                assert set(np.flatnonzero(changed)) == before.buckets(s)
                if after_live:
                    per = before.count(s) // len(after_live)
                    assert before.count(s) == per * len(after_live)
                    expected = sorted(Transfer(s, t, per) for t in after_live)
                    assert transfers(before, after) == expected
                else:
                    assert transfers(before, after) == [Transfer(s, None, B)]
            else:  # recovery of s
                assert set(np.flatnonzero(changed)) == after.buckets(s)
                if live:
                    per = after.count(s) // len(live)
                    assert transfers(before, after) == sorted(Transfer(t, s, per) for t in live)
            checked += 1
    assert checked == 255 * 8


def test_no_history_dependence_is_structural() -> None:
    # The owner array is a function of the live set: equal sets give equal arrays.
    a = assign({0, 3, 5})
    b = assign([5, 3, 0])
    assert np.array_equal(a.owners, b.owners)


def test_contiguous_ranges_when_all_live() -> None:
    a = assign(range(8))
    for s in range(8):
        assert a.ranges(s) == ((s * 5040, s * 5040 + 5039),)


def test_fragmentation_matches_the_documented_figures() -> None:
    worst = {n: 0 for n in range(1, 9)}
    for live in SUBSETS:
        a = assign(live)
        worst[len(live)] = max(worst[len(live)], *(len(a.ranges(s)) for s in live))
    assert worst[8] == 1
    assert worst[5] == 16
    assert worst[4] == 65
    assert 1900 <= worst[2] <= 2100


def test_empty_live_set_has_no_owner() -> None:
    a = assign(())
    assert (a.owners == NO_OWNER).all()
    assert a.owner(0) is None
    full = assign({2})
    assert transfers(a, full) == [Transfer(None, 2, B)]


def test_smaller_groups_use_permanently_dead_slots() -> None:
    # A group of 3 (slots 0..2) that later adds slot 3 moves exactly 1/4 of the space.
    three = assign({0, 1, 2})
    four = assign({0, 1, 2, 3})
    assert moved_buckets(three, four) == B // 4


def test_replaceable_table() -> None:
    t = factorial_table(3)
    assert t.buckets == 6
    a = assign({0, 2}, t)
    assert a.count(0) == a.count(2) == 3
    custom = OrderingTable([[1, 0], [0, 1]])
    assert assign({0, 1}, custom).owners.tolist() == [1, 0]


@pytest.mark.parametrize(
    ("orderings", "message"),
    [([[0, 0], [1, 0]], "permutation"), ([], "non-empty")],
)
def test_bad_tables_are_refused(orderings: list[list[int]], message: str) -> None:
    with pytest.raises(AssignmentError, match=message):
        OrderingTable(orderings)


def test_bad_slots_are_refused() -> None:
    with pytest.raises(AssignmentError, match="slot 8"):
        assign({8})
    with pytest.raises(AssignmentError, match="bucket 40320"):
        assign({1}).owner(B)


def test_owner_arrays_are_read_only() -> None:
    a = assign({1, 2})
    with pytest.raises(ValueError):
        a.owners[0] = 3


def test_merge_ranges() -> None:
    assert merge_ranges([]) == ()
    assert merge_ranges([5, 1, 2, 3, 9, 10]) == ((1, 3), (5, 5), (9, 10))


def test_assignments_from_different_tables_are_not_compared() -> None:
    with pytest.raises(AssignmentError):
        transfers(assign({0}), assign({0}, factorial_table(2)))


events = st.lists(st.integers(min_value=0, max_value=7), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(events)
def test_random_event_sequences(toggles: list[int]) -> None:
    """Toggle members up/down in any order: every state equals a fresh computation,
    every step moves exactly the toggled member's share, balanced among the others."""
    live: set[int] = set(range(8))
    prev = assign(live)
    for s in toggles:
        was_live = s in live
        live.symmetric_difference_update({s})
        cur = assign(live)
        fresh = OrderingTable(TABLE.orderings).owners(frozenset(live))
        assert np.array_equal(cur.owners, fresh)
        moved = moved_buckets(prev, cur)
        moved_share = prev.count(s) if was_live else cur.count(s)
        assert moved == moved_share
        for t in transfers(prev, cur):
            assert s in (t.source, t.target)
            others = len(live) if was_live else len(live) - 1
            if others:
                assert t.buckets == moved // others
        prev = cur
