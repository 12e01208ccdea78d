"""Heartbeat loss vs false failovers (root): at which loss rate do live members start to be
declared dead with the default timing (heartbeat 100 ms, dead after 400 ms)?

One lab (``--nodes``, default 4, prefix ``mhtCl<hex>-``, removed at the end).  For each
loss rate P (``--rates``), an nft rule at the switch drops P % of heartbeats, independently
per receiver (:mod:`multihost.lab.netfaults`), for ``--seconds``; nobody fails for real, so
every ``member-dead`` an agent logs is a false failover.  Also counted: ``lease-lapsed``
(a node gives up its buckets for a moment because a peer's ack is too old — new
connections to them wait for a SYN retransmission), and view changes.  Between rates the
loss is removed and the lab must converge again.

The model column is the expected number of false ``member-dead`` for independent loss:
a receiver misses >= dead_after/interval consecutive heartbeats of one sender, about
``pairs * (seconds/interval) * p**k * (1 - p)`` with k = 4.

``--agent-nice N`` runs the agents at nice N (CPU starvation of the agents looks like loss).

    sudo .venv/bin/python bench/bench_loss.py --rates 0,5,10,15,20,30,40 --seconds 30
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from multihost.lab import agents, build, chaos, netfaults
from multihost.lab.build import LabState
from multihost.lab.clean import clean
from multihost.lab.failover import agent_status, wait_converged
from multihost.lab.topology import describe

EVENTS = ("member-dead", "lease-lapsed", "view-changed", "suspended")


def _logs(state: LabState) -> dict[str, Path]:
    out = {}
    for n in state.topology.members:
        rec = agents.agent_record(state, n)
        assert rec is not None
        out[n] = Path(rec["log"])
    return out


def _count(state: LabState, since: dict[str, int]) -> dict[str, int]:
    total = dict.fromkeys(EVENTS, 0)
    for n, path in _logs(state).items():
        with open(path, "rb") as f:
            f.seek(since[n])
            text = f.read().decode(errors="replace")
        for e in EVENTS:
            total[e] += text.count(f"event={e} ")
    return total


def _sent(state: LabState) -> int:
    return sum(
        (agent_status(state, n) or {}).get("counters", {}).get("heartbeats_sent", 0)
        for n in state.topology.members
    )


def measure(state: LabState, percent: int, seconds: float) -> dict[str, Any]:
    since = {n: p.stat().st_size for n, p in _logs(state).items()}
    sent0 = _sent(state)
    netfaults.set_loss(state, percent)
    time.sleep(seconds)  # the exposure itself (a measurement window, not synchronisation)
    drops = netfaults.counters(state).get("sw", 0)
    sent = _sent(state) - sent0
    netfaults.heal(state)
    counts = _count(state, since)
    settle = wait_converged(state, state.topology.members, timeout=60)
    n = len(state.topology.nodes)
    p = percent / 100
    model = n * (n - 1) * (seconds / 0.1) * p**4 * (1 - p)
    return {
        "loss_percent": percent,
        "seconds": seconds,
        "heartbeats_sent": sent,
        "dropped_share": round(drops / max(1, sent * (n - 1)), 3),
        **counts,
        "model_member_dead": round(model, 2),
        "settled_s": round(settle, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rates", default="0,5,10,15,20,25,30,40,50")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--agent-nice", type=int)
    ap.add_argument("--out", help="write the JSON rows here")
    args = ap.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    prefix = f"mhtCl{secrets.token_hex(2)}-"
    rows = []
    try:
        state = build.build(describe(args.nodes, prefix=prefix))
        chaos.renice(state, args.agent_nice)
        wait_converged(state, state.topology.members, timeout=30, quiet=True)
        print("loss%  member-dead  model  lease-lapsed  view-changed  dropped  settled_s")
        for p in rates:
            r = measure(state, p, args.seconds)
            rows.append(r)
            print(
                f"{p:5d}  {r['member-dead']:11d}  {r['model_member_dead']:5.1f}  "
                f"{r['lease-lapsed']:12d}  {r['view-changed']:12d}  "
                f"{r['dropped_share']:7.3f}  {r['settled_s']:9.2f}",
                flush=True,
            )
    finally:
        clean(prefix)
    first = next((r["loss_percent"] for r in rows if r["member-dead"] > 0), None)
    lapse = next((r["loss_percent"] for r in rows if r["lease-lapsed"] > 0), None)
    print(f"false failovers (member-dead) from {first}% loss; lease lapses from {lapse}%")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "nice": args.agent_nice, "nodes": args.nodes}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
