"""Long chaos run (root) and two targeted scenarios that isolate what the long run shows.

* ``run`` (default): :func:`multihost.lab.chaos.run_lab` for ``--duration`` seconds on a
  fresh lab; writes the JSON report (``--out``) and prints a summary with the losses broken
  down by the node that reset them and the time since the last event.
* ``--scenario drain``: one node drained (and undrained) under 16 long-lived streams, the
  agents' handover state sampled every 250 ms: shows when the new owners promote their
  ``incoming`` buckets to ``owned`` compared with the drained node's remaining flows.
* ``--scenario link``: one node's link down for 3 s and back, same sampling.

``--agent-nice N`` runs the agents at nice N (by PID, the lab's own agents only), to
separate CPU starvation of the agents from the product's own behaviour; ``--quorum`` builds
the lab with ``cluster.quorum = true``.  The lab uses the
prefix ``mhtCb<hex>-`` and is removed at the end, whatever happens.

Must not: touch anything outside its own lab.

    sudo .venv/bin/python bench/bench_chaos.py --duration 600 --seed 7 --out /tmp/chaos.json
    sudo .venv/bin/python bench/bench_chaos.py --scenario drain --agent-nice -10
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import threading
import time
from collections import Counter
from typing import Any

from multihost.control import request
from multihost.lab import agents, build, chaos, faults
from multihost.lab.clean import clean
from multihost.lab.failover import agent_status, wait_converged
from multihost.lab.state import LabState
from multihost.lab.topology import describe


def summary(res: dict[str, Any]) -> str:
    ll = res["long_lived"]
    lines = [
        f"seed {res['seed']}, {res['duration_s']} s, nodes {','.join(res['nodes'])}, "
        f"{len(res['events'])} events, agent nice {res.get('agent_nice')}",
        f"connections attempted {res['attempted']}, succeeded {res['succeeded']}, "
        f"failed {res['failed']}, answered by two nodes {res['duplicates']}",
        f"long-lived: {ll['total']} opened, {ll['requests']} requests, reset by last event "
        + ", ".join(f"{k} {v}" for k, v in ll["reset"].items()),
        f"lost on a failed node {res['lost_on_crashed_node']} {res['lost_on_failed_node']}, "
        f"lost otherwise {res['lost_other']} {res['lost_other_by_last_event']}",
        f"new connections: {res['short']['by_outcome']}, connect ms {res['short']['connect_ms']}"
        f", over 1 s {res['short']['connect_over_1s']}",
        f"heartbeat gaps > 300 ms seen by the client: {len(res['heartbeat_long_gaps'])}",
        "agents' log events: "
        + json.dumps(
            {n: {k: v for k, v in e.items() if v} for n, e in res["agent_log_events"].items()}
        ),
    ]
    return "\n".join(lines)


def _sample(state: LabState, stop: threading.Event, out: list[dict[str, Any]]) -> None:
    while not stop.is_set():
        row: dict[str, Any] = {"t": time.time()}
        for n in state.topology.members:
            s = agent_status(state, n, timeout=0.5)
            if s is None:
                row[n] = None
                continue
            h = s["handover"]
            row[n] = {
                "owned": s["groups"]["web"]["owned"]["buckets"] - h["incoming_buckets"],
                "incoming": h["incoming_buckets"],
                "draining": h["draining_buckets"],
                "flows_draining": h["flows_draining"],
            }
        out.append(row)
        stop.wait(0.25)


def scenario(state: LabState, which: str, node: str = "D") -> dict[str, Any]:
    samples: list[dict[str, Any]] = []
    events: list[tuple[float, str]] = []
    stop = threading.Event()
    with chaos.Traffic(state, {"streams": 16, "rate": 0}) as tr:
        sampler = threading.Thread(target=_sample, args=(state, stop, samples))
        sampler.start()
        time.sleep(1.5)  # traffic on every node first (a fixed script, not synchronisation)
        if which == "drain":
            for cmd in ("drain", "undrain"):
                events.append((time.time(), f"{cmd} {node}"))
                request(agents.control_socket(state, node), cmd)
                time.sleep(4.0)
        else:
            events.append((faults.fail(state, node, "link")["t"], f"link {node}"))
            time.sleep(3.0)
            events.append((faults.recover(state, node)["t"], f"recover {node}"))
            time.sleep(5.0)
        rows = tr.stop()
        stop.set()
        sampler.join()
    t0 = tr.t_ready
    macs = {n.mac: n.name for n in state.topology.nodes}

    def ms(t: float) -> int:
        return round((t - t0) * 1000)

    lost = []
    for r in rows:
        if r["outcome"] == "ok":
            continue
        by = sorted({macs.get(m, m) for m, v in r["macs"].items() if v[1]})
        lost.append(
            {"t_ms": ms(r["t_end"]), "on": r["node"], "outcome": r["outcome"], "reset_by": by}
        )
    changes, prev = [], None
    for s in samples:
        key = {n: s[n] for n in state.topology.members}
        if key != prev:
            changes.append({"t_ms": ms(s["t"]), **key})
            prev = key
    return {
        "events": [{"t_ms": ms(t), "event": e} for t, e in events],
        "lost": sorted(lost, key=lambda x: x["t_ms"]),
        "lost_by": dict(
            Counter(f"on {x['on'] or '-'} reset by {','.join(x['reset_by']) or '-'}" for x in lost)
        ),
        "status_changes": changes,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scenario", choices=["run", "drain", "link"], default="run")
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--agent-nice", type=int)
    ap.add_argument("--quorum", action="store_true", help="cluster.quorum = true")
    ap.add_argument("--out", help="write the JSON report here")
    args = ap.parse_args()
    prefix = f"mhtCb{secrets.token_hex(2)}-"

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        if args.scenario == "run":
            res = chaos.run_lab(
                prefix,
                args.nodes,
                args.duration,
                args.seed,
                streams=args.streams,
                rate=args.rate,
                agent_nice=args.agent_nice,
                quorum=args.quorum,
                max_examples=2000,
                progress=say,
            )
            print(summary(res))
        else:
            drain_ms = 600_000  # long-lived flows may drain for the whole scenario
            topo = describe(args.nodes, prefix=prefix)
            state = build.build(topo, max_drain_ms=drain_ms, quorum=args.quorum)
            chaos.renice(state, args.agent_nice)
            wait_converged(state, state.topology.members, timeout=30, quiet=True)
            res = scenario(state, args.scenario)
            res.update(agent_nice=args.agent_nice, quorum=args.quorum)
            print(json.dumps(res, indent=1))
    finally:
        clean(prefix)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
