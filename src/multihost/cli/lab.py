"""``multihost lab``: build, inspect, probe and remove a namespace lab on this host.

Owns: the ``lab`` subcommand (its actions, registered in ``--help`` order: ``up``
(:mod:`multihost.cli.lab_up`), ``down``, ``clean``, ``status``, ``set-live``, the actions of
:mod:`multihost.cli.lab_probe`, ``lab_cluster``, ``lab_chaos`` and ``lab_demo``, then ``exec``)
and the arguments, help texts and output (text or one JSON object) of the actions defined
here.  Must not: contain lab logic; it calls :mod:`multihost.lab.build`, ``state``, ``clean``
and ``processes``.  Errors (:func:`multihost.cli.lab_common.handle`): invalid input ->
:class:`UsageError` (exit 2); a failed operation -> one ``multihost: error: ...`` line and
exit 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from multihost.assignment import assign, slots_of
from multihost.cli import lab_chaos, lab_cluster, lab_demo, lab_probe, lab_up
from multihost.cli.common import Formatter, UsageError, add_json_flag, print_json
from multihost.cli.lab_common import FILES, handle, prefix_of, print_overview, state_of
from multihost.lab import build as labbuild
from multihost.lab.clean import clean as clean_lab
from multihost.lab.naming import NETNS_DIR, PREFIX_ENV
from multihost.lab.processes import process_alive
from multihost.lab.state import LabError, load_state, require_root

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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "lab", help="build and probe a namespace lab", description=LAB, formatter_class=Formatter
    )
    acts = p.add_subparsers(dest="lab_command", metavar="ACTION", required=True)

    def action(name: str, helptext: str, desc: str, func: Callable[..., int]) -> Any:
        a = acts.add_parser(name, help=helptext, description=desc, formatter_class=Formatter)
        a.add_argument("--prefix", help=f"lab name prefix (default: ${PREFIX_ENV} or 'mh-')")
        a.set_defaults(func=handle(func))
        return a

    lab_up.register_actions(action)

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

    lab_probe.register_actions(action, state_of)
    lab_cluster.register_actions(action, state_of)
    lab_chaos.register_actions(action, state_of)
    lab_demo.register_actions(action, state_of)

    a = action("exec", "run a command in a lab namespace", EXEC, run_exec)
    a.add_argument("host", metavar="HOST", help="A.., c1.., client, sw, bsw, b1.., rt")
    a.add_argument("cmd", metavar="-- CMD", nargs=argparse.REMAINDER, help="command and args")


def run_down(args: argparse.Namespace) -> int:
    require_root()
    state = state_of(args)
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
    require_root()
    report = clean_lab(prefix_of(args))
    if args.json:
        print_json(report.to_dict())
    else:
        for line in report.lines():
            print(line)
        if not report.removed_anything and not report.errors:
            print(f"nothing to clean for prefix {report.prefix!r}")
    return 1 if report.errors else 0


def run_status(args: argparse.Namespace) -> int:
    prefix = prefix_of(args)
    state = load_state(prefix)
    if state is None:
        if args.json:
            print_json({"prefix": prefix, "up": False})
        else:
            print(f"no lab with prefix {prefix!r}")
        return 1
    topo = state.topology
    namespaces = {n: (NETNS_DIR / n).exists() for n in state.namespaces}
    procs = [{"name": p.name, "pid": p.pid, "alive": process_alive(p)} for p in state.processes]
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
    print_overview(state)
    down = [n for n, ok in namespaces.items() if not ok]
    dead = [f"{p['name']} (pid {p['pid']})" for p in procs if not p["alive"]]
    print(f"\nprocesses: {len(procs) - len(dead)}/{len(procs)} running")
    if down:
        print(f"missing namespaces: {', '.join(down)}")
    if dead:
        print(f"not running: {', '.join(dead)}")
    return 0 if healthy else 1


def run_set_live(args: argparse.Namespace) -> int:
    require_root()
    state = state_of(args)
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
    require_root()
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("no command given (multihost lab exec HOST -- CMD ...)")
    state = state_of(args)
    topo = state.topology
    netns = topo.netns_of(args.host)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp("ip", ["ip", "netns", "exec", netns, *cmd])
    except OSError as e:
        raise LabError(f"cannot run ip netns exec: {e}") from None
