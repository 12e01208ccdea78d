"""Heartbeat loss vs false failovers (root): at which loss rate do live members start to be
declared dead with the default timing (heartbeat 100 ms, dead after 230 ms), and is any
flow then served twice?

One lab (``--nodes``, default 4, prefix ``mhtCl<hex>-``, removed at the end).  For each
loss rate P (``--rates``), an nft rule at the switch drops P % of heartbeats, independently
per receiver (:mod:`multihost.lab.netfaults`), for ``--seconds``; nobody fails for real, so
every ``member-dead`` an agent logs is a false failover.  Also counted: ``lease-lapsed``
(a node gives up its buckets for a moment because a peer's ack is too old — new
connections to them wait for a SYN retransmission), and view changes.  Between rates the
loss is removed and the lab must converge again.

The model column is the expected number of false ``member-dead`` for independent loss:
a receiver misses >= dead_after/interval consecutive heartbeats of one sender, about
``pairs * (seconds/interval) * p**k * (1 - p)`` with k = floor(dead_after / interval)
(2 at the defaults; 4 before issue 11).

**Double service**: during each window the chaos worker (``lab/chaos_worker.py``) in the
client opens ``--rate`` new connections per second (and keeps ``--streams`` long-lived
ones); its packet capture counts flows answered (non-RST) by two nodes -- ``duplicates``,
which must stay 0.  Client traffic is not subject to the heartbeat loss rule.
``--no-traffic`` skips it (the numbers before issue 11).

``--agent-nice N`` runs the agents at nice N (CPU starvation of the agents looks like loss).
``--prefix`` names the lab (default ``mhtCl<random>-``).

    sudo .venv/bin/python bench/bench_loss.py --rates 0,5,10,15,20,30,40 --seconds 30
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from multihost.config import load_config
from multihost.lab import agents, build, chaos, netfaults
from multihost.lab.clean import clean
from multihost.lab.failover import agent_status, wait_converged
from multihost.lab.state import LabState
from multihost.lab.topology import describe

EVENTS = ("member-dead", "lease-lapsed", "view-changed", "suspended", "peer-suspect")


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


def measure(
    state: LabState, percent: int, seconds: float, traffic: dict[str, Any] | None = None
) -> dict[str, Any]:
    since = {n: p.stat().st_size for n, p in _logs(state).items()}
    sent0 = _sent(state)
    served: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        if traffic is not None:
            worker = stack.enter_context(chaos.Traffic(state, {"seed": percent, **traffic}))
        netfaults.set_loss(state, percent)
        time.sleep(seconds)  # the exposure itself (a measurement window, not synchronisation)
        drops = netfaults.counters(state).get("sw", 0)
        sent = _sent(state) - sent0
        netfaults.heal(state)
        if traffic is not None:
            rows = worker.stop()
            macs = {n.mac: n.name for n in state.topology.nodes}
            res = chaos.analyse(rows, [], macs, worker.t_ready)
            served = {
                "connections": res["attempted"],
                "duplicates": res["duplicates"],
                "duplicate_examples": res["duplicate_examples"],
                "failed": res["failed"],
                "connect_over_1s": res["short"]["connect_over_1s"],
            }
    counts = _count(state, since)
    settle = wait_converged(state, state.topology.members, timeout=60)
    n = len(state.topology.nodes)
    p = percent / 100
    k = load_config(state.directory / "agents" / "cluster.toml").cluster.dead_after_ms // 100
    model = n * (n - 1) * (seconds / 0.1) * p**k * (1 - p)
    return {
        "loss_percent": percent,
        "seconds": seconds,
        "heartbeats_sent": sent,
        "dropped_share": round(drops / max(1, sent * (n - 1)), 3),
        **counts,
        "model_member_dead": round(model, 2),
        "settled_s": round(settle, 2),
        **served,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rates", default="0,5,10,15,20,25,30,40,50")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--agent-nice", type=int)
    ap.add_argument("--out", help="write the JSON rows here")
    ap.add_argument("--prefix", help="lab prefix (default mhtCl<random>-)")
    ap.add_argument("--dead-after-ms", type=int, help="instead of the configuration's default")
    ap.add_argument("--no-traffic", action="store_true", help="no client traffic (no duplicates)")
    ap.add_argument("--rate", type=float, default=20.0, help="new connections per second")
    ap.add_argument("--streams", type=int, default=4, help="long-lived connections")
    args = ap.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    prefix = args.prefix or f"mhtCl{secrets.token_hex(2)}-"
    traffic = None
    if not args.no_traffic:
        traffic = {"streams": args.streams, "rate": args.rate, "timeout": 5.0}
        traffic["stream_timeout"] = 3.0
    rows = []
    try:
        state = build.build(describe(args.nodes, prefix=prefix), dead_after_ms=args.dead_after_ms)
        chaos.renice(state, args.agent_nice)
        wait_converged(state, state.topology.members, timeout=30, quiet=True)
        print(
            "loss%  member-dead  model  lease-lapsed  view-changed  dropped  settled_s  "
            "conns  duplicates  over_1s"
        )
        for p in rates:
            r = measure(state, p, args.seconds, traffic)
            rows.append(r)
            print(
                f"{p:5d}  {r['member-dead']:11d}  {r['model_member_dead']:5.1f}  "
                f"{r['lease-lapsed']:12d}  {r['view-changed']:12d}  "
                f"{r['dropped_share']:7.3f}  {r['settled_s']:9.2f}  "
                f"{r.get('connections', '-'):>5}  {r.get('duplicates', '-'):>10}  "
                f"{r.get('connect_over_1s', '-'):>7}",
                flush=True,
            )
    finally:
        clean(prefix)
    first = next((r["loss_percent"] for r in rows if r["member-dead"] > 0), None)
    lapse = next((r["loss_percent"] for r in rows if r["lease-lapsed"] > 0), None)
    print(f"false failovers (member-dead) from {first}% loss; lease lapses from {lapse}%")
    if traffic is not None:
        print(f"double service (duplicates): {sum(r['duplicates'] for r in rows)} in all")
    if args.out:
        meta = {"nice": args.agent_nice, "nodes": args.nodes, "dead_after_ms": args.dead_after_ms}
        with open(args.out, "w") as f:
            json.dump({"rows": rows, **meta, "argv": sys.argv[1:]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
