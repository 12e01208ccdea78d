"""``multihost lab probe``: open flows from a client and compare who answered with the model.

Owns: the action's arguments, help text and output (text or one JSON object).  Must not:
contain the logic (:mod:`multihost.lab.probe`, imported only when the action runs).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from multihost.cli.common import add_json_flag, print_json, render_table
from multihost.cli.lab_common import FILES
from multihost.lab.state import LabState, require_root

Action = Callable[[str, str, str, Callable[..., int]], Any]
StateOf = Callable[[argparse.Namespace], LabState]

PROBE = f"""\
Open CONNECTIONS flows from a client namespace, each from its own explicitly bound source
port (ports drawn from --port-seed, so a run can be repeated), concurrently, and record which
node answered each: TCP (default) does one HTTP/1.0 GET (the node is the body's first line),
--udp sends one datagram to the echo service, --icmp one echo request, ICMPv6 with --ipv6
(the node is found from the reply's source MAC; ICMP hashes on addresses only, so pings
rotate over the client's 17 source addresses and distinct ids).  Each flow's expected node
is computed by the model (flowhash + assignment, with the lab's seed and the live set from
the state file); flows answered by another node are 'mispredicted'.  --target NODE-ADDRESS
probes one node directly (every flow is then expected from that node).  Progress goes to
stderr.

--json prints {{"connections", "answered": {{"A": n, ...}}, "failed", "reset", "timeout",
"mispredicted", "duplicated", "unanswered_by_expected": {{"A": n, ...}}, "shares", "band",
"outside_band", ...}}: reset = refused or reset, failed = anything else unexpected,
duplicated = flows answered by more than one node (UDP, ICMP), unanswered_by_expected =
flows not answered, by predicted node; shares = each live node's exact share of the traffic
IP's buckets, band = the central 99.9 % of Binomial(connections, share), outside_band =
nodes whose count is not.  ICMP hashes the addresses only: its band is that of
Binomial(hash_keys, share) for the hash_keys distinct source addresses, times the flows a
source sends.

In a transparent lab ('lab up --transparent', TCP) the node is the proxy's X-Multihost-Node
header and the JSON adds "transparency": {{"return", "backends": {{"b1": n, ...}},
"seen_client" (answers whose back end saw the client's own address), "seen_client_port"
(and its port), "seen_other", "no_backend", "backend_log": {{"b1": {{"requests", "client",
"other"}}}} (the back ends' $remote_addr logs), "replies": {{"A": {{"held", "closed",
"stray"}}}},
"stray_replies"}}: TCP packets from the back ends counted on each node's back-end
interface: held = the node has the connection's socket, closed = the node opened the
connection (conntrack knows it) but its socket is gone (a late FIN), stray = arrived at a
node that never held the connection.  --check then also needs
seen_other, no_backend, stray_replies and every log's "other" to be 0.  --flows adds
"flows": [{{"flow", "outcome", "node", "expected", "backend", "seen"}}, ...].

examples:
  multihost lab probe --connections 3000
  multihost lab probe --udp --connections 1000 --json
  multihost lab probe --icmp --connections 200
  multihost lab probe --target 198.18.0.11 --connections 500 --check
  multihost lab probe --connections 5 --flows      (a transparent lab: who saw what)

{FILES}
"""


def register_actions(action: Action, state_of: StateOf) -> None:
    a = action("probe", "probe the traffic IP from a client", PROBE, _run(state_of))
    a.add_argument(
        "--connections", type=int, metavar="N", default=1000, help="flows (default 1000)"
    )
    kind = a.add_mutually_exclusive_group()
    kind.add_argument("--udp", action="store_true", help="UDP echo instead of TCP/HTTP")
    kind.add_argument(
        "--icmp", action="store_true", help="ICMP echo (ICMPv6 with --ipv6) instead of TCP/HTTP"
    )
    a.add_argument("--target", metavar="ADDR", help="traffic IP (default) or a node's address")
    a.add_argument("--ipv6", action="store_true", help="the IPv6 traffic IP ('lab up --ipv6')")
    a.add_argument(
        "--client", default="c1", metavar="HOST", help="client to probe from (default c1)"
    )
    a.add_argument(
        "--concurrency", type=int, metavar="N", default=200, help="flows in flight (default 200)"
    )
    a.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        default=3.0,
        help="per flow, seconds (default 3)",
    )
    a.add_argument(
        "--rate",
        type=float,
        metavar="PER_SECOND",
        default=0.0,
        help="start at most this many flows a second, tcp/udp (default 0: no limit); "
        "keeps a probe running while you fail and recover nodes in another shell",
    )
    a.add_argument(
        "--port-seed", type=int, metavar="N", help="seed of the source ports (default random)"
    )
    a.add_argument("--sources", type=int, metavar="K", help="client addresses to rotate over")
    a.add_argument("--check", action="store_true", help="exit 1 unless every flow was as expected")
    a.add_argument(
        "--flows",
        action="store_true",
        help="list every connection: node, expected node, back end, client address it saw",
    )
    add_json_flag(a)


def _run(state_of: StateOf) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        require_root()
        return run_probe(args, state_of(args))

    return run


def run_probe(args: argparse.Namespace, state: LabState) -> int:
    from multihost.lab.probe import run_probe as probe

    proto = "udp" if args.udp else "icmp" if args.icmp else "tcp"

    def progress(done: int, total: int) -> None:
        print(f"\rprobe: {done}/{total}", end="" if done < total else "\n", file=sys.stderr)

    result = probe(
        state,
        proto,
        args.connections,
        target=args.target,
        client=args.client,
        concurrency=args.concurrency,
        timeout=args.timeout,
        port_seed=args.port_seed,
        sources=args.sources,
        progress=progress,
        family=6 if args.ipv6 else 4,
        flows=args.flows,
        rate=args.rate,
    )
    if args.json:
        print_json(result.to_dict())
    else:
        for f in result.flows or []:
            seen = f" backend {f['backend']} saw {f['seen']}" if "backend" in f else ""
            print(f"{f['flow']} {f['outcome']} node {f['node']} (expected {f['expected']}){seen}")
        print(
            f"{result.connections} {proto} flows to {result.target} in {result.seconds:.1f}s "
            f"({result.rate:.0f}/s), live {','.join(result.live) or '(none)'}"
        )
        names = sorted(set(result.answered) | set(result.predicted))
        band = result.band
        rows = [
            [
                n,
                str(result.answered.get(n, 0)),
                str(result.predicted.get(n, 0)),
                str(result.shares.get(n, "-")),
                "{}..{}".format(*band[n]) if n in band else "-",
            ]
            for n in names
        ]
        print(render_table(["NODE", "ANSWERED", "PREDICTED", "SHARE", "99.9% BAND"], rows))
        print(
            f"failed {result.failed}, reset {result.reset}, timeout {result.timeout}, "
            f"mispredicted {result.mispredicted}, duplicated {result.duplicated}"
            + (
                f", outside the band: {','.join(result.outside_band)}"
                if result.outside_band
                else ""
            )
        )
        for err, n in sorted(result.errors.items()):
            print(f"  {n} x {err}")
        for ex in result.examples:
            print(f"  e.g. {ex['flow']} answered by {ex['node']}, expected {ex['expected']}")
        if result.transparency is not None:
            _print_transparency(result.transparency)
    return 1 if args.check and not result.ok else 0


def _print_transparency(t: dict[str, Any]) -> None:
    served = ", ".join(f"{b} {n}" for b, n in t["backends"].items())
    print(f"back ends ({t['return']} return): {served}")
    print(
        f"  client address seen by the back end: real {t['seen_client']} "
        f"(and port {t['seen_client_port']}), other {t['seen_other']}, "
        f"no back end {t['no_backend']}"
    )
    logs = ", ".join(
        f"{b} {v['client']}/{v['requests']} client" for b, v in t["backend_log"].items()
    )
    print(f"  back-end logs ($remote_addr): {logs}")
    stray = ", ".join(f"{n} {v['stray']}" for n, v in t["replies"].items())
    print(f"  replies at a node without the connection: {t['stray_replies']} ({stray})")
