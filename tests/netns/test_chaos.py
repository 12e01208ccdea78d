"""``lab chaos``: a short seeded chaos run on a 4-node lab (root), and the schedule and the
accounting it relies on (pure).

The run asserts the two safety properties of issue "No connection left behind": no
connection is answered by two nodes, and no connection is lost except on a node that
crashed (or lost its link) while the connection lived.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from multihost.lab import chaos
from multihost.lab.naming import state_dir

MACS = {"02:00:00:00:00:0a": "A", "02:00:00:00:00:0b": "B", "02:00:00:00:00:0c": "C"}


@pytest.mark.parametrize("seed", range(20))
def test_schedule_keeps_two_serving_and_undoes_everything(seed: int) -> None:
    members = ("A", "B", "C", "D")
    events = chaos.plan(members, 60.0, seed)
    assert events and all(e.kind in chaos.KINDS for e in events)
    assert [e.t for e in events] == sorted(e.t for e in events)
    failed: set[str] = set()
    drained: set[str] = set()
    for e in events:
        if e.kind in chaos.FAILS:
            assert e.node not in failed
            failed.add(e.node)
            if e.kind == "crash":
                drained.discard(e.node)
        elif e.kind == "recover":
            failed.remove(e.node)
        elif e.kind == "drain":
            assert e.node not in drained | failed
            drained.add(e.node)
        else:
            drained.remove(e.node)
        assert len(set(members) - failed - drained) >= 2, e
    assert not failed and not drained
    assert chaos.plan(members, 60.0, seed) == events  # reproducible


def _row(
    kind: str, sport: int, outcome: str, node: str, macs: dict[str, list[float]], **kw: Any
) -> dict[str, Any]:
    row = {"kind": kind, "saddr": "198.18.0.201", "sport": sport, "t0": 1.0, "t_conn": 1.0}
    row.update(t_end=9.0, outcome=outcome, error="", node=node, nodes=[node], requests=5)
    return {**row, "t_last": 9.0, "macs": macs, **kw}


def test_analyse_classifies_losses_and_duplicates() -> None:
    a, b, c = list(MACS)
    events = [
        {"t": 3.0, "kind": "crash", "node": "A", "event": "crash A"},
        {"t": 5.0, "kind": "drain", "node": "C", "event": "drain C"},
    ]
    rows = [
        _row("stream", 1, "ok", "B", {b: [50, 0, 0.0, 1.0]}),
        _row("stream", 2, "reset", "A", {a: [20, 0, 0.0, 1.0], b: [0, 1, 3.5, 0.0]}),  # A crashed
        _row(
            "stream", 3, "reset", "C", {c: [20, 0, 0.0, 1.0], b: [0, 1, 6.0, 0.0]}
        ),  # C only drained
        _row("short", 4, "ok", "B", {b: [3, 0, 0.0, 1.0], c: [1, 0, 0.0, 1.2]}),  # two answered
        _row("short", 5, "timeout", "", {}, requests=0),  # nobody answered
    ]
    res = chaos.analyse(rows, events, MACS, 0.0)
    assert (res["attempted"], res["succeeded"], res["failed"]) == (5, 4, 1)
    assert res["duplicates"] == 1
    assert res["lost_on_crashed_node"] == 1 and res["lost_on_failed_node"] == {"crash": 1}
    assert res["lost_other"] == 2
    assert res["long_lived"]["reset"] == {**dict.fromkeys(chaos.KINDS, 0), "crash": 1, "drain": 1}
    drained = next(x for x in res["lost_other_examples"] if x["flow"].endswith(":3"))
    assert drained["reset_by"] == ["B"] and drained["last_event"] == "drain C"


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_short_chaos_run_loses_nothing_but_crashed_nodes_flows(
    lab_backend: str, family: str
) -> None:
    prefix = f"mhtCc{secrets.token_hex(2)}-"
    res = chaos.run_lab(
        prefix, 4, 30.0, seed=2, streams=12, rate=20.0, backend=lab_backend, ipv6=family == "ipv6"
    )
    assert set(res["dataplane"].values()) == {lab_backend}
    assert res["family"] == family
    assert not state_dir(prefix).exists()  # the run removed the lab it built
    kinds = {e["event"].split()[0] for e in res["events"]}
    assert len(res["events"]) >= 6 and {"crash", "recover"} <= kinds, res["events"]
    assert res["attempted"] >= 400 and res["long_lived"]["total"] >= 12
    assert res["capture"]["drops"] == 0, res["capture"]  # the evidence is complete
    assert res["converged_after_s"] < 30
    keys = ("duplicates", "lost_other", "lost_other_by_last_event", "duplicate_examples")
    summary = {k: res[k] for k in (*keys, "lost_other_examples", "events")}
    assert res["duplicates"] == 0, summary
    assert res["lost_other"] == 0, summary
