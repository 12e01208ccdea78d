"""``multihost lab chaos|loss|partition|heal``: a chaos run, and faults of the cluster network.

Owns: these actions' arguments, help texts and output (text or one JSON object).
Must not: contain the logic (:mod:`multihost.lab.chaos`, :mod:`multihost.lab.netfaults`,
imported only when an action runs: every ``multihost`` command, the agent included, builds
this parser).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from multihost.cli.common import UsageError, add_json_flag, print_json
from multihost.config import DATAPLANES as BACKENDS
from multihost.lab.naming import default_prefix, validate_prefix
from multihost.lab.state import LabState, require_root

if TYPE_CHECKING:
    from multihost.lab.netfaults import FaultSpec

Action = Callable[[str, str, str, Callable[..., int]], Any]
StateOf = Callable[[argparse.Namespace], LabState]

CHAOS = """\
Keep traffic flowing through the lab while a seeded random schedule crashes, recovers,
drains, undrains and link-flaps nodes (at least 2 nodes stay live and undrained; whatever
was failed or drained is undone before the end), then account for every connection.

Traffic, from client c1: --streams long-lived HTTP/1.1 keep-alive connections (a request
every 50 ms for as long as each lives; one that ends is replaced on a new source port) and
--rate new connections per second (one HTTP/1.0 GET each).  A packet capture on the client
tells which node(s) sent packets on every connection.

Uses the lab with the prefix if one is up (every node healthy), else builds a --nodes lab
(cluster.max_drain_ms set to outlast the run) and removes it afterwards (--keep: leave it).

Report (--json: one object): attempted/succeeded/failed connections, duplicates
(connections answered by two nodes: must be 0), long_lived.total and long_lived.reset by
the most recent event before each reset, lost_on_crashed_node (a connection whose
answering node crashed or lost its link while it lived: expected), lost_other (every other
lost connection: must be 0), events, and the evidence (examples, heartbeat gaps, agents'
log events).  Exit status 1 if duplicates or lost_other is not 0.

examples:
  multihost lab chaos --duration 60 --seed 1
  multihost lab chaos --duration 600 --seed 7 --nodes 6 --json
"""

LOSS = """\
Drop PERCENT % of the heartbeats (udp/7946) on the cluster network, with nft numgen rules:
at the switch (default; each receiver's copy independently) or --node NODE (what that node
sends and receives).  Client traffic is never touched.  0 removes the rule.  'lab heal'
removes every network fault.

examples:
  multihost lab loss 20
  multihost lab loss 50 --node C
"""

PARTITION = """\
Block every heartbeat between two sets of nodes (both directions) at the switch, while
client traffic still reaches every node.  Without quorum both sides serve the buckets they
think orphaned (split brain); with 'lab up --quorum' the minority serves nothing.

example:
  multihost lab partition A,B,C D,E
"""


def register_actions(action: Action, state_of: StateOf) -> None:
    a = action("chaos", "chaos run: failures under long-lived traffic", CHAOS, _chaos)
    a.add_argument("--duration", type=float, default=60.0, metavar="S", help="default 60")
    a.add_argument("--seed", type=int, default=1, metavar="N", help="schedule seed (default 1)")
    a.add_argument("--nodes", type=int, metavar="N", help="4..8, when building (default 4)")
    a.add_argument("--streams", type=int, default=16, metavar="K", help="long-lived (16)")
    a.add_argument("--rate", type=float, default=20.0, metavar="R", help="new conns/s (20)")
    a.add_argument("--keep", action="store_true", help="keep a lab this run built")
    a.add_argument("--agent-nice", type=int, metavar="N", help="run the agents at nice N")
    a.add_argument("--quorum", action="store_true", help="build the lab with quorum = true")
    a.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="when building: cluster.dataplane of the agents (default auto)",
    )
    a.add_argument(
        "--ipv6",
        action="store_true",
        help="traffic to the IPv6 traffic IP (builds a dual-stack lab, heartbeats over IPv6)",
    )
    add_json_flag(a)
    a = action("loss", "drop a share of the heartbeats", LOSS, _loss(state_of))
    a.add_argument("percent", type=int, metavar="PERCENT")
    a.add_argument("--node", action="append", metavar="NODE", help="at a node (repeatable)")
    add_json_flag(a)
    a = action("partition", "cut heartbeats between two sides", PARTITION, _part(state_of))
    a.add_argument("side_a", metavar="NODES")
    a.add_argument("side_b", metavar="NODES")
    add_json_flag(a)
    desc = "Remove every heartbeat loss rule and partition ('lab loss', 'lab partition')."
    a = action("heal", "remove network faults", desc, _heal(state_of))
    add_json_flag(a)


def _chaos(args: argparse.Namespace) -> int:
    require_root()
    if args.nodes is not None and not 4 <= args.nodes <= 8:
        raise UsageError(f"--nodes {args.nodes} is outside 4..8")
    if not 5 <= args.duration <= 86_400:
        raise UsageError(f"--duration {args.duration} is outside 5..86400 seconds")
    if args.streams < 0 or args.rate < 0:
        raise UsageError("--streams and --rate must not be negative")
    prefix = validate_prefix(args.prefix or default_prefix())
    from multihost.lab import chaos

    def say(msg: str) -> None:
        if not args.json:
            print(f"chaos: {msg}", file=sys.stderr)

    res = chaos.run_lab(
        prefix,
        args.nodes,
        args.duration,
        args.seed,
        keep=args.keep,
        streams=args.streams,
        rate=args.rate,
        agent_nice=args.agent_nice,
        quorum=args.quorum,
        backend=args.backend,
        ipv6=args.ipv6,
        progress=say,
    )
    if args.json:
        print_json(res)
    else:
        _print(res)
    return 1 if res["duplicates"] or res["lost_other"] else 0


def _print(res: dict[str, Any]) -> None:
    ll = res["long_lived"]
    print(
        f"chaos seed {res['seed']}: {res['duration_s']} s, nodes {','.join(res['nodes'])}, "
        f"{len(res['events'])} events"
    )
    print(
        f"connections: attempted {res['attempted']}, succeeded {res['succeeded']}, "
        f"failed {res['failed']}, answered by two nodes {res['duplicates']}"
    )
    resets = ", ".join(f"{k} {v}" for k, v in ll["reset"].items())
    print(f"long-lived: {ll['total']} opened, reset by last event: {resets}")
    print(
        f"lost on a crashed node {res['lost_on_crashed_node']} {res['lost_on_failed_node']}, "
        f"lost otherwise {res['lost_other']} {res['lost_other_by_last_event']}"
    )
    for ex in res["lost_other_examples"][:10]:
        print(f"  e.g. {json_line(ex)}")


def json_line(obj: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in obj.items())


def _loss(state_of: StateOf) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        require_root()
        from multihost.lab import netfaults

        where = args.node or [netfaults.SWITCH]
        spec = netfaults.set_loss(state_of(args), args.percent, where)
        _report(args, spec)
        return 0

    return run


def _part(state_of: StateOf) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        require_root()
        from multihost.lab import netfaults

        a = [n.strip() for n in args.side_a.split(",") if n.strip()]
        b = [n.strip() for n in args.side_b.split(",") if n.strip()]
        _report(args, netfaults.partition(state_of(args), a, b))
        return 0

    return run


def _heal(state_of: StateOf) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        require_root()
        from multihost.lab import netfaults

        _report(args, netfaults.heal(state_of(args)))
        return 0

    return run


def _report(args: argparse.Namespace, spec: FaultSpec) -> None:
    if args.json:
        print_json(spec.to_dict())
        return
    if spec.empty:
        print("cluster network: no faults")
        return
    for where, p in spec.loss.items():
        print(f"heartbeat loss {p}% at {where}")
    for a, b in spec.partitions:
        print(f"partition {','.join(a)} | {','.join(b)}")
