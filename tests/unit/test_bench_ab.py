"""The toggled A/B estimator of the data-plane benchmark (``bench/dp_tcp.py``), pure.

Owns: that each "on" stretch is set against the mean of the "off" stretches beside it (so a
linear drift of the machine cancels), that stretches without an "off" on both sides are not
used, and the order-statistics interval of the median.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from bench.dp_tcp import ab_summary, median_ci


def windows(rates: list[tuple[bool, list[float]]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    t = 0.0
    for on, mbps in rates:
        for m in mbps:
            out.append({"on": on, "start": t, "end": t + 0.25, "mbps": m})
            t += 0.25
    return out


def test_linear_drift_cancels() -> None:
    # The machine speeds up by 100 Mbit/s per stretch; "on" costs exactly 2 %.
    stretches = [(k % 2 == 1, [(9000 + 100 * k) * (0.98 if k % 2 else 1.0)] * 4) for k in range(9)]
    r = ab_summary(windows(stretches))
    assert r["on_blocks"] == 4 and r["off_blocks"] == 5
    assert r["ratios"] == pytest.approx([0.98] * 4, abs=1e-4)
    assert r["ratio"]["median"] == pytest.approx(0.98, abs=1e-3)
    # off stretches at both ends: the pooled means are balanced as well
    assert r["pooled_ratio"] == pytest.approx(0.98, abs=1e-3)


def test_on_stretches_at_the_ends_are_not_compared() -> None:
    stretches = [(True, [100.0]), (False, [100.0]), (True, [90.0]), (False, [100.0])]
    r = ab_summary(windows(stretches))
    assert r["ratios"] == [0.9]


def test_no_comparison_without_both_states() -> None:
    r = ab_summary(windows([(True, [100.0, 100.0])]))
    assert r["ratios"] == [] and "ratio" not in r and "pooled_ratio" not in r


def test_median_interval_widens_with_fewer_values() -> None:
    values = [float(v) for v in range(100)]
    lo, hi = median_ci(values)
    assert (lo, hi) == (40.0, 59.0)
    assert median_ci([1.0, 2.0, 3.0]) == (1.0, 3.0)


def test_pooled_interval_covers_the_true_ratio_and_excludes_none() -> None:
    rng = np.random.default_rng(5)
    stretches = [
        (k % 2 == 1, list(3000 * (0.97 if k % 2 else 1.0) * rng.normal(1, 0.1, 4)))
        for k in range(400)
    ]
    r = ab_summary(windows(stretches))
    lo, hi = r["pooled_ci95"]
    assert lo < 0.97 < hi
    assert hi < 0.98  # 200 pairs resolve a 3 % cost against 10 % noise per interval
    # the same schedule without a difference (A/A): 1 inside
    flat = [(on, [x / (0.97 if on else 1.0) for x in v]) for on, v in stretches]
    lo, hi = ab_summary(windows(flat))["pooled_ci95"]
    assert lo < 1.0 < hi


def test_median_interval_is_the_whole_range_below_eight_values() -> None:
    assert median_ci([float(v) for v in range(7)]) == (0.0, 6.0)
    assert median_ci([float(v) for v in range(8)]) == (1.0, 6.0)
