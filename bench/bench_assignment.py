"""Benchmark: owners + ranges for a live set (target: <= 5 ms for any live set).

Run: .venv/bin/python bench/bench_assignment.py
Measures, for every one of the 255 live subsets of 8 slots, the time to compute the owner of
every bucket and the merged ranges of every live slot, with a fresh (uncached) table, so the
number is the real computation and not the per-table cache.  Prints min/median/max over the
255 subsets, repeated interleaved with the cached path for a side-by-side ratio.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import time

from multihost.assignment import Assignment, OrderingTable, default_table

TARGET_MS = 5.0


def one(table: OrderingTable, live: frozenset[int]) -> float:
    t0 = time.perf_counter()
    a = Assignment(table, live)
    for s in live:
        a.ranges(s)
    return (time.perf_counter() - t0) * 1000


def main() -> int:
    base = default_table()
    subsets = [frozenset(c) for r in range(1, 9) for c in itertools.combinations(range(8), r)]
    rounds = 5
    cold: dict[frozenset[int], list[float]] = {s: [] for s in subsets}
    warm: list[float] = []
    for _ in range(rounds):
        fresh = OrderingTable(base.orderings)  # empty cache: the real computation
        for live in subsets:
            cold[live].append(one(fresh, live))
            warm.append(one(fresh, live))  # same table again: owners cached
    # Per live set, the median of its rounds (the machine is shared: single samples see
    # preemption); the target applies to the worst live set.
    per_set = {live: statistics.median(ts) for live, ts in cold.items()}
    worst_set = max(per_set, key=lambda k: per_set[k])
    everything = [t for ts in cold.values() for t in ts]
    result = {
        "subsets": len(subsets),
        "rounds": rounds,
        "per_set_median_ms": {
            "min": round(min(per_set.values()), 3),
            "median": round(statistics.median(per_set.values()), 3),
            "max": round(per_set[worst_set], 3),
            "worst_live_set": sorted(worst_set),
        },
        "all_samples_ms": {
            "p99": round(sorted(everything)[int(len(everything) * 0.99)], 3),
            "max": round(max(everything), 3),
        },
        "cached_ms_median": round(statistics.median(warm), 3),
        "target_ms": TARGET_MS,
        "ok": per_set[worst_set] <= TARGET_MS,
    }
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
