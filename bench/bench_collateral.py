"""Benchmark: collateral damage of one failure -- do the survivors keep serving their own
flows while a member dies?

Run (root): .venv/bin/python bench/bench_collateral.py [--runs 5] [--json] [--backend NAME]
            [--spacing 0.01] [--out bench/results_collateral.json]

Owns: one 4-node lab (``mhtFx-``, or ``$MULTIHOST_LAB_PREFIX`` with ``x``; default
configuration), ``--runs`` crash and ``--runs`` link-down failures interleaved (crash A,
link A, crash B, ...).  Each run is one :func:`multihost.lab.failover.measure`: a client
opens a new TCP connection (HTTP/1.0 GET, each from its own source port) every
``--spacing`` seconds to the failed member's buckets *and* one to the survivors' buckets,
before, during and after the failure, at the instant ``lab.faults.fail`` records.  Each
connection's bucket and owner come from the kernel-exact hash model
(:func:`multihost.lab.failover.port_bucket`, :mod:`multihost.assignment`).  A connection
may take up to ``--timeout`` seconds, so a dropped SYN shows as the client sees it: a
retransmission one second later.

Reported per run:

* *unaffected*: connections to buckets whose owner is a survivor (they never move):
  attempts, how many failed, took > 200 ms to connect, or were answered by a node other
  than the model's owner -- all three must be 0;
* *affected*: connections to the failed member's buckets started after the failure:
  attempts, answered by a survivor, by the model's new owner, and the time until they are
  served again (first such connection answered by a survivor; the last survivor's first;
  and the survivors' status owning their new shares);
* view changes other than the failure itself (false failovers) and lease lapses.

``--backend``: passed to the lab as its data plane backend; without it nothing is passed
(the lab's default).  Results: ``--out`` (JSON, every run); ``--json`` prints one JSON
object, else a table per failure kind.

Must not: touch anything but its own lab (removed afterwards), or edit ``src``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import fo_common as fc
from multihost.lab import failover, faults
from multihost.lab.state import LabState

PREFIX = "mhtFx-"
SLOW_MS = 200.0
OUT = fc.HERE / "results_collateral.json"
Row = dict[str, Any]


class Model:
    """The model's owner of each client flow for one live set."""

    def __init__(self, state: LabState, live: list[str]) -> None:
        self.topo = state.topology
        self.saddr = self.topo.host("c1").address
        self.owners = failover.expected_owners(self.topo, live)

    def owner(self, sport: int) -> str:
        bucket = failover.port_bucket(self.topo, self.saddr, sport)
        return self.topo.members[int(self.owners[bucket])]


def connect_ms(r: Row) -> float | None:
    return None if r["t_conn"] is None else (float(r["t_conn"]) - float(r["t0"])) * 1000


def collateral(state: LabState, result: failover.FailoverResult, live: list[str]) -> Row:
    """Reduce one measured failure to the figures this benchmark reports."""
    topo, t_fail = state.topology, result.t_fail
    before = [m for m in topo.members if m in live]
    after = [m for m in before if m != result.node]
    model_before, model_after = Model(state, before), Model(state, after)
    unaffected = [r for r in result.rows if r["kind"] == "control"]
    bad: list[Row] = []
    for r in unaffected:
        ms = connect_ms(r)
        want = model_before.owner(int(r["sport"]))
        why = (
            r["outcome"]
            if r["outcome"] != "answered"
            else "slow"
            if ms is None or ms > SLOW_MS
            else "wrong-owner"
            if r["node"] != want
            else ""
        )
        if why:
            bad.append({"sport": r["sport"], "why": why, "t0_ms": _ms(r["t0"], t_fail), "ms": ms})
    affected = [r for r in result.rows if r["kind"] == "target" and float(r["t0"]) >= t_fail]
    by_survivor = [r for r in affected if r["outcome"] == "answered" and r["node"] in after]
    right = [r for r in by_survivor if r["node"] == model_after.owner(int(r["sport"]))]
    first = result.flows["first_by_node_ms"]
    times = [first[n] for n in after if first.get(n) is not None]
    return {
        "node": result.node,
        "how": result.how,
        "t_fail": t_fail,
        "unaffected": {
            "attempts": len(unaffected),
            "after_failure": sum(float(r["t0"]) >= t_fail for r in unaffected),
            "failed": sum(b["why"] not in ("slow", "wrong-owner") for b in bad),
            "slow": sum(b["why"] == "slow" for b in bad),
            "wrong_owner": sum(b["why"] == "wrong-owner" for b in bad),
            "examples": bad[:10],
            "connect_ms": fc.summary([connect_ms(r) for r in unaffected]),
        },
        "affected": {
            "attempts": len(affected),
            "answered_by_survivor": len(by_survivor),
            "answered_by_new_owner": len(right),
            "answered_by_failed": sum(r["node"] == result.node for r in affected),
            "first_served_ms": result.first_ms,
            "all_survivors_serving_ms": max(times) if len(times) == len(after) else None,
            "status_all_owned_ms": result.all_served_ms,
        },
        "steady_before": result.flows["steady_before"],
        "worker_stop": result.worker_stop,
    }


def _ms(t: Any, t_fail: float) -> float:
    return round((float(t) - t_fail) * 1000, 1)


def run_one(state: LabState, i: int, node: str, how: str, args: argparse.Namespace) -> Row:
    live = list(state.live)
    survivors = [m for m in live if m != node]
    failover.wait_converged(state, live, quiet=True, timeout=90)
    time.sleep(0.3)
    cursor = failover.LogCursor(state)
    load = fc.loadavg()
    r = failover.measure(
        state,
        node,
        how,
        seed=i,
        spacing=args.spacing,
        timeout=args.timeout,
        control_every=1,
        linger=1.0,
        max_seconds=8.0,
    )
    row = collateral(state, r, live)
    views = cursor.events("view-changed", survivors)
    expected = [v for v in views if f"left={node}" in v and "joined=" not in v]
    row.update(
        i=i,
        unexpected_view_changes=len(views) - len(expected),
        lease_lapses=len(cursor.events("lease-lapsed", survivors)),
        loadavg=load,
    )
    faults.recover(state, node)
    failover.wait_converged(state, live, timeout=60)
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = fc.machine()
    rows: list[Row] = []
    with fc.lab(PREFIX, 4, backend=args.backend) as state:
        members = list(state.topology.members)
        failover.wait_converged(state, members, quiet=True, timeout=90)
        for i in range(2 * args.runs):
            how = ("crash", "link")[i % 2]
            node = members[(i // 2) % len(members)]
            row = run_one(state, i, node, how, args)
            rows.append(row)
            u, a = row["unaffected"], row["affected"]
            fc.log(
                f"{i + 1}/{2 * args.runs} {how:5} {node}: unaffected failed {u['failed']} "
                f"slow {u['slow']} wrong {u['wrong_owner']} of {u['attempts']}; affected "
                f"first {a['first_served_ms']} ms, all {a['all_survivors_serving_ms']} ms; "
                f"load {row['loadavg']}"
            )
    info["loadavg_end"] = fc.loadavg()
    return {
        "machine": info,
        "settings": {"spacing_s": args.spacing, "timeout_s": args.timeout, "slow_ms": SLOW_MS},
        "backend": args.backend,
        "rows": rows,
    }


def report(data: dict[str, Any]) -> str:
    lines = [
        "| failure | runs | unaffected conns: failed / > 200 ms / wrong owner / total | "
        "per run (bad) | affected conns: served again, first p50 / max (ms) | all survivors"
        " serving p50 / max (ms) | false view changes |",
        "|---|---|---|---|---|---|---|",
    ]
    for how in ("crash", "link"):
        rs = [r for r in data["rows"] if r["how"] == how]
        if not rs:
            continue
        u = [r["unaffected"] for r in rs]
        per_run = ", ".join(str(x["failed"] + x["slow"] + x["wrong_owner"]) for x in u)
        first = fc.summary([r["affected"]["first_served_ms"] for r in rs])
        alls = fc.summary([r["affected"]["all_survivors_serving_ms"] for r in rs])
        lines.append(
            f"| {how} | {len(rs)} | {sum(x['failed'] for x in u)} / {sum(x['slow'] for x in u)}"
            f" / {sum(x['wrong_owner'] for x in u)} / {sum(x['attempts'] for x in u)} | "
            f"{per_run} | {fc.fmt(first, 'p50')} / {fc.fmt(first, 'max')} | "
            f"{fc.fmt(alls, 'p50')} / {fc.fmt(alls, 'max')} | "
            f"{sum(r['unexpected_view_changes'] for r in rs)} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="per failure kind (default 5)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--backend", help="data plane backend for the lab (default: the lab's)")
    ap.add_argument("--spacing", type=float, default=0.01, help="s between attempts (0.01)")
    ap.add_argument("--timeout", type=float, default=3.0, help="s per connection (3)")
    ap.add_argument("--out", type=Path, default=OUT, help=f"results file (default {OUT.name})")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    try:
        fc.lab_backend(args.backend)
    except ValueError as e:
        ap.error(str(e))
    data = run(args)
    cmd = f".venv/bin/python bench/bench_collateral.py --runs {args.runs}"
    data["command"] = cmd + (f" --backend {args.backend}" if args.backend else "")
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    if args.json:
        print(json.dumps(data))
    else:
        print(report(data))
    bad = sum(r["unaffected"][k] for r in data["rows"] for k in ("failed", "slow", "wrong_owner"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
