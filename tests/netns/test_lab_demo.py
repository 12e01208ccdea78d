"""``lab demo`` in short: a 4-node lab with agents, one crash failover and one recovery.

Checks, with real packets: the lab converges to the right live set at every step, the
steady-state probes have no failed, duplicated (answered twice / reset) or mispredicted
connection, the measured shares are within 4.5 binomial standard deviations of the exact
ones (and the chi-square test does not reject them at 1e-4), and the failover is measured
(a correctness bound, 2 s; the benchmark is bench/bench_failover.py).  The lab is removed
even when the run fails.
"""

from __future__ import annotations

import json
import math
import secrets
import subprocess
import sys
from fractions import Fraction
from typing import Any

import pytest

from multihost.lab import demo
from multihost.lab.clean import clean
from multihost.lab.naming import NETNS_DIR, state_dir
from multihost.lab.state import LabError

CONNECTIONS = 1200


@pytest.fixture(scope="module")
def result(lab_backend: str) -> Any:
    prefix = f"mhtF{secrets.token_hex(2)}-"
    cfg = demo.DemoConfig(
        connections=CONNECTIONS,
        how="crash",
        prefix=prefix,
        events=("fail D", "recover D"),
        backend=lab_backend,
    )
    try:
        yield demo.run_demo(cfg)
    finally:
        clean(prefix)
        assert not state_dir(prefix).exists()
        assert not list(NETNS_DIR.glob(f"{prefix}*"))


def test_steps_and_live_sets(result: dict[str, Any]) -> None:
    assert [s["event"] for s in result["steps"]] == ["start", "fail D", "recover D"]
    assert [s["live"] for s in result["steps"]] == [
        ["A", "B", "C", "D"],
        ["A", "B", "C"],
        ["A", "B", "C", "D"],
    ]
    # the object is JSON (what 'lab demo --json' prints)
    assert json.loads(json.dumps(result)) == result


def test_steady_state_probes_are_clean(result: dict[str, Any]) -> None:
    for s in result["steps"]:
        assert s["connections"] == CONNECTIONS
        assert (s["failed"], s["duplicates"], s["mispredicted"]) == (0, 0, 0), s
        assert sum(s["observed"].values()) == CONNECTIONS
        assert set(s["observed"]) == set(s["live"])


def test_shares_match_theory(result: dict[str, Any]) -> None:
    for s in result["steps"]:
        n = len(s["live"])
        assert s["expected"] == {m: str(Fraction(1, n)) for m in s["live"]}
        for node, share in s["expected"].items():
            p = float(Fraction(share))
            sd = math.sqrt(CONNECTIONS * p * (1 - p))
            assert abs(s["observed"][node] - CONNECTIONS * p) < 4.5 * sd, (node, s)
        assert s["p_value"] > 1e-4, s


def test_failover_is_measured(result: dict[str, Any]) -> None:
    start, fail, recover = result["steps"]
    assert start["failover_ms"] is None and recover["failover_ms"] is None
    assert fail["failover_ms"] is not None and 0 < fail["failover_ms"] < 2000, fail["failover"]
    assert fail["all_served_ms"] is not None and fail["all_served_ms"] < 2000
    flows = fail["failover"]["flows"]
    assert flows["answered_before"] > 0  # the worker reached D before the failure
    assert set(flows["first_by_node_ms"]) == {"A", "B", "C"}  # D's buckets went to all three


def test_chi2_sf_matches_tables() -> None:
    # 5 % critical values of the chi-square distribution
    for x, df in ((3.841, 1), (5.991, 2), (7.815, 3), (9.488, 4), (14.067, 7)):
        assert demo.chi2_sf(x, df) == pytest.approx(0.05, abs=2e-4)
    assert demo.chi2_sf(0.0, 3) == 1.0


def test_demo_refuses_a_prefix_in_use() -> None:
    prefix = f"mhtF{secrets.token_hex(2)}-"
    state_dir(prefix).mkdir(parents=True)
    try:
        with pytest.raises(LabError, match="already exists"):
            demo.run_demo(demo.DemoConfig(prefix=prefix, events=()))
        assert state_dir(prefix).exists()  # not removed: it was not the demo's
    finally:
        state_dir(prefix).rmdir()


def test_cli_rejects_bad_input() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "multihost", "lab", "demo", "--how", "melt"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2 and "invalid choice" in out.stderr
