"""Weighted tables: every live subset balanced in proportion to weight, and a failure moves
only the failed node's buckets (all its virtual slots fail together), exhaustively."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from multihost.assignment import NO_OWNER, AssignmentError, assign
from multihost.tablechoice import cluster_table, table_identity, weighted_table
from multihost.weighted import WeightedTable, virtual_slots

CASES = [
    ((0, 2), (1, 1), (2, 1)),  # 4 virtual slots: factorial-8 underneath
    ((0, 3), (2, 1), (5, 2), (7, 1), (9, 1)),  # gaps in the node slots, 8 virtual
    ((0, 4), (1, 2), (2, 3), (3, 1), (4, 2)),  # 12 virtual: minwise-12 (27,720 buckets)
]


def test_virtual_slots_are_consecutive_in_slot_order() -> None:
    assert virtual_slots([(3, 1), (0, 2), (1, 1)]) == {0: (0, 1), 1: (2,), 3: (3,)}
    with pytest.raises(AssignmentError, match="weight 0"):
        virtual_slots([(0, 0)])
    with pytest.raises(AssignmentError, match="given twice"):
        virtual_slots([(0, 1), (0, 2)])


@pytest.mark.parametrize("weights", CASES)
def test_every_live_subset_is_balanced_by_weight(weights: tuple[tuple[int, int], ...]) -> None:
    table = weighted_table(weights)
    w = dict(weights)
    nodes = sorted(w)
    for r in range(1, len(nodes) + 1):
        for live in itertools.combinations(nodes, r):
            a = assign(frozenset(live), table)
            total = sum(w[s] for s in live)
            for s in live:
                assert a.count(s) * total == table.buckets * w[s], (live, s)
            assert int(np.count_nonzero(a.owners == NO_OWNER)) == 0


@pytest.mark.parametrize("weights", CASES)
def test_a_failure_moves_only_the_failed_nodes_buckets(
    weights: tuple[tuple[int, int], ...],
) -> None:
    table = weighted_table(weights)
    w = dict(weights)
    nodes = sorted(w)
    for r in range(2, len(nodes) + 1):
        for live in itertools.combinations(nodes, r):
            before = table.owners(frozenset(live))
            for failed in live:
                after = table.owners(frozenset(live) - {failed})
                moved = before != after
                assert np.all(before[moved] == failed), (live, failed)
                # ... to each survivor in proportion to its weight
                rest = sum(w[s] for s in live) - w[failed]
                got = np.bincount(after[moved], minlength=table.slots)
                for s in live:
                    if s != failed:
                        share = int(np.count_nonzero(before == failed)) * w[s]
                        assert got[s] * rest == share, (live, failed, s)
                # recovery is the inverse
                assert np.array_equal(table.owners(frozenset(live)), before)


def test_weight_one_everywhere_is_the_unweighted_table() -> None:
    assert cluster_table(((0, 1), (1, 1), (3, 1))) is cluster_table(((0, 1), (3, 1)))
    assert not isinstance(cluster_table(((0, 1), (1, 1))), WeightedTable)


def test_identity_names_weights_and_differs_from_unweighted() -> None:
    a = table_identity(weighted_table(((0, 2), (1, 1))))
    b = table_identity(weighted_table(((0, 1), (1, 2))))
    c = table_identity(cluster_table(((0, 1), (1, 1), (2, 1))))
    assert a.name == "factorial-8/weights-0:2,1:1"
    assert len({a.sha256, b.sha256, c.sha256}) == 3


def test_permutation_rows_without_sorting() -> None:
    from multihost.assignment import permutation_rows

    rows = np.array(
        [[0, 1, 2], [2, 1, 0], [0, 0, 2], [0, 1, 3], [-1, 1, 0], [1, 2, 0], [2, 2, 2]],
        dtype=np.int8,
    )
    assert permutation_rows(rows).tolist() == [True, True, False, False, False, True, False]
    rng = np.random.default_rng(3)
    perms = np.argsort(rng.random((500, 16)), axis=1).astype(np.int8)
    assert permutation_rows(perms).all()
    perms[7, 3] = perms[7, 4]
    assert permutation_rows(perms).tolist().count(False) == 1
