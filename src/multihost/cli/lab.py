"""``multihost lab``: build, inspect, probe and remove a namespace lab on this host.

Owns: the ``lab`` actions' arguments, help texts and output (text or one JSON object).
Must not: contain lab logic; it calls :mod:`multihost.lab.topology`, ``build``, ``clean``
and ``probe``.  Errors: invalid input -> :class:`UsageError` (exit 2); a failed operation ->
one ``multihost: error: ...`` line and exit 1.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from multihost.assignment import assign, slots_of
from multihost.cli.common import (
    Formatter,
    OperationError,
    UsageError,
    add_json_flag,
    print_json,
    render_table,
)
from multihost.config import DATAPLANES as BACKENDS
from multihost.lab import build as labbuild
from multihost.lab.backnet import NeighMode, Proxy, ReturnMode
from multihost.lab.clean import clean as clean_lab
from multihost.lab.topology import (
    MAX_CLIENTS,
    MAX_NODES,
    NETNS_DIR,
    PREFIX_ENV,
    SwitchMode,
    Topology,
    TopologyError,
    default_prefix,
    describe,
    validate_prefix,
)
from multihost.simulation import SimulationError, parse_weights
from multihost.tablechoice import TABLE_KINDS, backend_problem, table_identity

FILES = f"""\
files:
  /run/multihost-lab/PREFIX/state.json   what the lab created and started (PIDs, start times)
  /run/multihost-lab/PREFIX/             nginx configs and logs, UDP echo logs
  /run/netns/PREFIX{{sw,A..P,c1..c8}}      the lab's network namespaces
  /run/netns/PREFIX{{bsw,b1,b2,rt}}        back-end switch, back ends, router

environment:
  {PREFIX_ENV}   name prefix of everything the lab creates (default 'mh-'); --prefix wins

exit status: 0 success, 1 the operation failed, 2 invalid input."""

LAB = f"""\
A lab is a cluster of network namespaces on this host, wired to one switch: a Linux bridge
with IGMP snooping in its own namespace.  Nodes A, B, ... each run nginx on port 80 (the
body's first line is the node's name) and a UDP echo service on port 7 (the reply's first
line is the node's name); clients c1, ... send traffic.  Every address is in 198.18.0.0/15
and the cluster group in 239.192.0.0/14; nothing is added to the root namespace.  The
traffic IP is held by the per-node agents, which 'lab up' starts last.

Needs root.  Typical session:
  multihost lab up --nodes 4
  multihost lab probe --connections 3000
  multihost lab set-live A,C,D
  multihost lab probe --connections 3000
  multihost lab down

{FILES}
"""

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

EXEC = f"""\
Run a command inside a lab namespace (as 'ip netns exec' does): HOST is a node (A, B, ...),
a client (c1, ...; 'client' means c1), 'sw' (the switch), or in a transparent or routed lab
'bsw' (the back-end switch), a back end (b1, b2) or 'rt' (the router).  The exit status is the
command's.  'lab down' stops anything still running in the lab's namespaces.

examples:
  multihost lab exec c1 -- curl -s http://198.18.0.11/
  multihost lab exec A -- nft list ruleset
  multihost lab exec sw -- bridge mdb show

{FILES}
"""


def _handle(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except TopologyError as e:
            raise UsageError(str(e)) from None
        except labbuild.LabError as e:
            raise OperationError(str(e)) from None

    return wrapper


def _prefix(args: argparse.Namespace) -> str:
    return validate_prefix(args.prefix or default_prefix())


def _state(args: argparse.Namespace) -> labbuild.LabState:
    prefix = _prefix(args)
    state = labbuild.load_state(prefix)
    if state is None:
        raise labbuild.LabError(
            f"no lab with prefix {prefix!r} is up ('multihost lab up' builds one; "
            "'multihost lab clean' removes leftovers of a broken one)"
        )
    return state


def _seed(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed {text!r} is not an integer") from None
    if not 0 <= value <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"seed {text!r} is not a 32-bit value")
    return value


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "lab", help="build and probe a namespace lab", description=LAB, formatter_class=Formatter
    )
    acts = p.add_subparsers(dest="lab_command", metavar="ACTION", required=True)

    def action(name: str, helptext: str, desc: str, func: Callable[..., int]) -> Any:
        a = acts.add_parser(name, help=helptext, description=desc, formatter_class=Formatter)
        a.add_argument("--prefix", help=f"lab name prefix (default: ${PREFIX_ENV} or 'mh-')")
        a.set_defaults(func=_handle(func))
        return a

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
    a.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="the agents' data plane: cluster.dataplane (default auto: xdp if it can run)",
    )
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

    desc = "Stop everything the lab started and delete its namespaces and state.\n\n" + FILES
    a = action("down", "remove the lab", desc, run_down)
    add_json_flag(a)

    desc = (
        "Remove every leftover of any lab with the prefix, even one whose builder crashed: "
        "recorded processes (only if PID, start time and command line still match), "
        "processes inside the lab's namespaces, the namespaces (exact names only) and the "
        "state directory.  Safe to repeat; reports what it removed.\n\n" + FILES
    )
    a = action("clean", "remove leftovers of any earlier lab", desc, run_clean)
    add_json_flag(a)

    desc = (
        "Show the lab: traffic IP, seed, nodes, live set, and whether every namespace "
        "exists and every recorded process runs.  Exit status 1 if there is no lab or it "
        "is degraded.\n\n" + FILES
    )
    a = action("status", "show the lab and its health", desc, run_status)
    add_json_flag(a)

    desc = (
        "Make NODES (comma-separated, e.g. A,C; '' for none) the live set: the agents are "
        "told, and the state file records it for 'lab probe' predictions.\n\n"
        "example:\n  multihost lab set-live A,C,D\n\n" + FILES
    )
    a = action("set-live", "set the live nodes", desc, run_set_live)
    a.add_argument("live", metavar="NODES", help="live nodes, e.g. A,C")
    add_json_flag(a)

    from multihost.cli import lab_chaos, lab_cluster, lab_demo, lab_probe

    lab_probe.register_actions(action, _state)
    lab_cluster.register_actions(action, _state)
    lab_chaos.register_actions(action, _state)
    lab_demo.register_actions(action, _state)

    a = action("exec", "run a command in a lab namespace", EXEC, run_exec)
    a.add_argument("host", metavar="HOST", help="A.., c1.., client, sw, bsw, b1.., rt")
    a.add_argument("cmd", metavar="-- CMD", nargs=argparse.REMAINDER, help="command and args")


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
        _prefix(args),
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
    _print_overview(state)
    c = topo.clients[0]
    print("\ntry:")
    print("  multihost lab probe --connections 1000")
    if topo.backnet is not None:
        print("  multihost lab probe --connections 5 --flows")
    print(f"  multihost lab exec {c.name} -- curl -s http://{topo.nodes[0].address}/")
    return 0


def _print_overview(state: labbuild.LabState) -> None:
    topo = state.topology
    print(
        f"  traffic IP {' '.join(topo.vips)} tcp/{topo.port} udp/{topo.echo_port}  "
        f"group {topo.group} (MAC {topo.group_mac})"
        + (f", heartbeats {topo.group6} (MAC {topo.group6_mac})" if topo.group6 else "")
    )
    print(
        f"  seed {topo.seed_text}, {topo.buckets} buckets ({table_identity(topo.table).name}),"
        f" hash {topo.hash_mode}, "
        f"switch {topo.switch.netns} ({topo.switch.mode.value})"
    )
    print(f"  live: {','.join(state.live) or '(none)'}\n")
    rows = [[h.name, h.role, h.netns, h.address, h.address6 or "-", h.mac] for h in topo.hosts]
    if topo.router is not None:
        rt = topo.router
        rows.append(["rt", f"router ({rt.neigh.value})", rt.netns, rt.address, "-", rt.mac])
    bn = topo.backnet
    if bn is not None:
        rows += [[b.name, "back end", b.netns, b.address, "-", b.mac] for b in bn.backends]
    print(render_table(["HOST", "ROLE", "NETNS", "ADDRESS", "ADDRESS6", "MAC"], rows))
    if bn is not None:
        print(
            f"\ntransparent: {bn.proxy.value} proxies, return {bn.mode.value}"
            + (f" via {bn.return_vip}" if bn.return_vip else " (per-node routes)")
            + ", node gateways "
            + " ".join(f"{n}={a}" for n, a in bn.gateways)
        )


def run_down(args: argparse.Namespace) -> int:
    labbuild.require_root()
    state = _state(args)
    report = labbuild.teardown(state)
    if args.json:
        print_json(report.to_dict())
    else:
        print(
            f"lab {state.prefix} is down: stopped {len(report.stopped)} process(es), "
            f"deleted {len(report.namespaces)} namespace(s)"
        )
    return 0


def run_clean(args: argparse.Namespace) -> int:
    labbuild.require_root()
    report = clean_lab(_prefix(args))
    if args.json:
        print_json(report.to_dict())
    else:
        for line in report.lines():
            print(line)
        if not report.removed_anything and not report.errors:
            print(f"nothing to clean for prefix {report.prefix!r}")
    return 1 if report.errors else 0


def run_status(args: argparse.Namespace) -> int:
    prefix = _prefix(args)
    state = labbuild.load_state(prefix)
    if state is None:
        if args.json:
            print_json({"prefix": prefix, "up": False})
        else:
            print(f"no lab with prefix {prefix!r}")
        return 1
    topo = state.topology
    namespaces = {n: (NETNS_DIR / n).exists() for n in state.namespaces}
    procs = [
        {"name": p.name, "pid": p.pid, "alive": labbuild.process_alive(p)} for p in state.processes
    ]
    healthy = state.status == "up" and all(namespaces.values()) and all(p["alive"] for p in procs)
    if args.json:
        print_json(
            {
                **topo.summary(),
                "up": state.status == "up",
                "status": state.status,
                "healthy": healthy,
                "live": state.live,
                "created": state.created,
                "namespaces": namespaces,
                "processes": procs,
                "agents": state.agents,
            }
        )
        return 0 if healthy else 1
    print(f"lab {prefix}: {state.status}{'' if healthy else ' (DEGRADED)'}, since {state.created}")
    _print_overview(state)
    down = [n for n, ok in namespaces.items() if not ok]
    dead = [f"{p['name']} (pid {p['pid']})" for p in procs if not p["alive"]]
    print(f"\nprocesses: {len(procs) - len(dead)}/{len(procs)} running")
    if down:
        print(f"missing namespaces: {', '.join(down)}")
    if dead:
        print(f"not running: {', '.join(dead)}")
    return 0 if healthy else 1


def run_set_live(args: argparse.Namespace) -> int:
    labbuild.require_root()
    state = _state(args)
    live = [n.strip() for n in args.live.split(",") if n.strip()]
    unknown = [n for n in live if n not in state.topology.members]
    if unknown:
        raise UsageError(f"unknown node {unknown[0]!r} (nodes: {','.join(state.topology.members)})")
    labbuild.set_live(state, live)
    a = assign(slots_of(state.live, state.topology.members), state.topology.table)
    members = state.topology.members
    shares = {members[s]: str(a.share(s)) for s in sorted(a.live)}
    if args.json:
        print_json({"live": state.live, "shares": shares})
    else:
        print(f"live: {','.join(state.live) or '(none)'}")
        for name, share in shares.items():
            print(f"  {name} owns {share} of the buckets")
    return 0


def run_exec(args: argparse.Namespace) -> int:
    labbuild.require_root()
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("no command given (multihost lab exec HOST -- CMD ...)")
    state = _state(args)
    topo = state.topology
    netns = topo.netns_of(args.host)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp("ip", ["ip", "netns", "exec", netns, *cmd])
    except OSError as e:
        raise labbuild.LabError(f"cannot run ip netns exec: {e}") from None
