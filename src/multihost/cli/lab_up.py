"""``multihost lab up``: describe a lab from its options and build it.

Owns: the action's arguments, help text and output (text or one JSON object), and the checks
of its options that the description cannot make (an option that needs another, a table too
big for the data plane).  Must not: contain the logic (:func:`multihost.lab.topology.describe`
describes the lab, :func:`multihost.lab.build.build` builds it).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from multihost.cli.common import UsageError, add_json_flag, print_json
from multihost.cli.lab_common import FILES, add_backend_option, prefix_of, print_overview
from multihost.lab import build as labbuild
from multihost.lab.backnet import NeighMode, Proxy, ReturnMode
from multihost.lab.naming import MAX_CLIENTS, MAX_NODES
from multihost.lab.topology import SwitchMode, Topology, describe
from multihost.simulation import SimulationError, parse_weights
from multihost.tablechoice import TABLE_KINDS, backend_problem

Action = Callable[[str, str, str, Callable[..., int]], Any]

UP = f"""\
Create the lab: namespaces, the switch, one veth pair per host, addresses, nginx and the UDP
echo service on every node, then the agents.  All or nothing: if a step fails, everything
made so far is removed and the error names the step.  Fails if a lab with the prefix exists.

Switch modes (--switch): frames to the traffic IP carry the group's multicast MAC but a
unicast IP; the bridge cannot match those against its IP-keyed snooping table, so:
  snooping  snooping + querier on, node ports are permanent multicast-router ports: the
            traffic IP reaches every node and no client (default; for about 1 s after
            'lab up', until the querier takes effect, the bridge floods it to clients too)
  flood     snooping on, no querier: the bridge floods multicast to every port
  strict    snooping + querier on, no router ports: the traffic IP reaches NO node
            (a snooping switch not configured for the cluster)

IP transparency (--transparent, docs/transparency.md): a second switch PREFIXbsw behind
the nodes (198.19.0.0/17; each node's eth1 is its backend_gateway, 198.19.0.11 ...) with
back ends PREFIXb1 and PREFIXb2 running nginx that answers its own name and the client
address it saw (and logs $remote_addr).  Each node runs a transparent proxy to them on
port 80 (the response header X-Multihost-Node names the node); the lab sets up the proxies'
policy routing and counts, on every node, the back ends' replies that reached a node
without the connection's socket.
  --return routes   each back end has an address per node and routes replies by source
                    ('multihost backend-routes --apply' from the lab's [[backend]] tables);
                    traffic IP hash 4-tuple
  --return gateway  the back ends' default route is a return traffic IP (198.19.0.100)
                    hosted by the agents (a return group); hash source-ip-port (haproxy)
                    or source-ip (nginx) in front, the reply's destination side behind
  --proxy nginx     proxy_bind $remote_addr transparent (client address only)
  --proxy haproxy   source 0.0.0.0 usesrc client (address and port; clientip with routes)

Upstream router (--routed, docs/switches.md): clients sit behind PREFIXrt (client ck on
198.19.(128+k).0/24) and reach the traffic IP through it.  The router drops ARP replies
with a multicast sender MAC (RFC 1812, like most hardware routers), so it reaches the
traffic IP only through its static neighbour entry (--router-neigh static, the default);
--router-neigh arp leaves it to ARP and demonstrates the failure.

examples:
  multihost lab up --nodes 4
  multihost lab up --nodes 8 --clients 2 --seed 0x5eed1234 --json
  multihost lab up --nodes 12 --weights A=2,B=2
  multihost lab up --nodes 4 --table minimal
  multihost lab up --transparent --return routes
  multihost lab up --transparent --return gateway --proxy haproxy
  multihost lab up --routed

{FILES}
"""


def _seed(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed {text!r} is not an integer") from None
    if not 0 <= value <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"seed {text!r} is not a 32-bit value")
    return value


def register_actions(action: Action) -> None:
    a = action("up", "build the lab and start its services", UP, run_up)
    a.add_argument(
        "--nodes", type=int, metavar="N", default=4, help=f"nodes, 1..{MAX_NODES} (default 4)"
    )
    a.add_argument(
        "--clients", type=int, metavar="K", default=1, help=f"clients, 1..{MAX_CLIENTS} (default 1)"
    )
    a.add_argument(
        "--seed", type=_seed, metavar="SEED", help="hash seed (default: random, printed)"
    )
    a.add_argument(
        "--switch",
        choices=[m.value for m in SwitchMode],
        default=SwitchMode.SNOOPING.value,
        help="how the switch forwards multicast (default snooping; see above)",
    )
    a.add_argument(
        "--manual",
        action="store_true",
        help="agents without heartbeats: ownership follows 'lab set-live' (release, then take)",
    )
    a.add_argument(
        "--heartbeat-ms",
        type=int,
        metavar="MS",
        help="agents' heartbeat interval (default 100; 25 x nodes above 8 nodes)",
    )
    a.add_argument(
        "--dead-after-ms",
        type=int,
        metavar="MS",
        help="silence until dead (default 2 x interval + 30)",
    )
    a.add_argument(
        "--quorum", action="store_true", help="cluster.quorum = true (minority serves nothing)"
    )
    a.add_argument(
        "--max-drain-ms", type=int, metavar="MS", help="cluster.max_drain_ms (default 60000)"
    )
    add_backend_option(a)
    a.add_argument(
        "--ipv6",
        action="store_true",
        help="dual stack: IPv6 addresses (2001:db8::/64), IPv6 traffic IP, heartbeats on ff15::1",
    )
    a.add_argument(
        "--transparent",
        action="store_true",
        help="back ends behind the nodes, reached through transparent proxies (see above)",
    )
    a.add_argument(
        "--return",
        dest="return_mode",
        choices=[m.value for m in ReturnMode],
        help="how back ends' replies find their node (with --transparent; default routes)",
    )
    a.add_argument(
        "--proxy",
        choices=[p.value for p in Proxy],
        help="the nodes' transparent proxy (with --transparent; default: nginx with "
        "--return routes, haproxy with --return gateway)",
    )
    a.add_argument(
        "--routed",
        action="store_true",
        help="the clients reach the traffic IP through a router namespace (see above)",
    )
    a.add_argument(
        "--router-neigh",
        choices=[m.value for m in NeighMode],
        help="how the router learns the traffic IP's MAC (with --routed; default static)",
    )
    a.add_argument(
        "--weights",
        metavar="A=K,...",
        help="[[node]].weight of nodes (integer >= 1, default 1): a node of weight K serves K"
        " times the share; the sum is at most 16 (12 with nft or auto)",
    )
    a.add_argument(
        "--table",
        choices=TABLE_KINDS,
        default="factorial",
        help="the agents' [cluster] table: factorial (default: 8! = 40,320 buckets up to 8"
        " slots) or minimal (lcm(1..n) buckets: 12 for 4 nodes, 840 for 8)",
    )
    add_json_flag(a)


def _weights(text: str | None, nodes: int) -> dict[str, int] | None:
    if not text:
        return None
    names = [chr(ord("A") + i) for i in range(max(0, min(nodes, MAX_NODES)))]
    try:
        weights = parse_weights(text, names)
    except SimulationError as e:
        raise UsageError(str(e)) from None
    return dict(zip(names, weights, strict=True))


def _check_table(topo: Topology, backend: str) -> None:
    """The agents would refuse a table too big for their data plane: say so before building
    (``auto`` is held to nft's limit, as ``check-config`` holds it)."""
    size = sum(topo.node_weights) if topo.weighted else len(topo.nodes)
    problem = backend_problem(size, "xdp" if backend == "xdp" else "nft")
    if problem is not None:
        what = f"--weights add up to {size}" if topo.weighted else f"--nodes {size}"
        raise UsageError(f"{what}: {problem} (--backend {backend})")


def run_up(args: argparse.Namespace) -> int:
    for flag, value, needs in (
        ("--return", args.return_mode, args.transparent),
        ("--proxy", args.proxy, args.transparent),
        ("--router-neigh", args.router_neigh, args.routed),
    ):
        if value is not None and not needs:
            base = "--routed" if flag == "--router-neigh" else "--transparent"
            raise UsageError(f"{flag} {value} needs {base}")
    topo = describe(
        args.nodes,
        args.clients,
        prefix_of(args),
        seed=args.seed,
        switch_mode=SwitchMode(args.switch),
        ipv6=args.ipv6,
        transparent=ReturnMode(args.return_mode or "routes") if args.transparent else None,
        routed=args.routed,
        router_neigh=NeighMode(args.router_neigh or "static"),
        proxy=Proxy(args.proxy) if args.proxy else None,
        weights=_weights(args.weights, args.nodes),
        table_kind=args.table,
    )
    _check_table(topo, args.backend)
    started = time.monotonic()

    def progress(step: str) -> None:
        if not args.json:
            print(f"lab {topo.prefix}: {step}", file=sys.stderr)

    state = labbuild.build(
        topo,
        progress,
        manual=args.manual,
        heartbeat_ms=args.heartbeat_ms,
        dead_after_ms=args.dead_after_ms,
        quorum=args.quorum,
        max_drain_ms=args.max_drain_ms,
        backend=args.backend,
    )
    took = time.monotonic() - started
    if args.json:
        print_json(
            {
                **topo.summary(),
                "state": str(state.path),
                "seconds": round(took, 2),
                "backend": args.backend,
                "dataplane": state.agents.get("dataplane", {}),
            }
        )
        return 0
    print(
        f"lab {topo.prefix} is up: {len(topo.nodes)} nodes, {len(topo.clients)} client(s), "
        f"built in {took:.1f}s"
    )
    print_overview(state)
    c = topo.clients[0]
    print("\ntry:")
    print("  multihost lab probe --connections 1000")
    if topo.backnet is not None:
        print("  multihost lab probe --connections 5 --flows")
    print(f"  multihost lab exec {c.name} -- curl -s http://{topo.nodes[0].address}/")
    return 0
