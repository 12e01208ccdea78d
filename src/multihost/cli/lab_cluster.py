"""``multihost lab fail|recover|drain|undrain``: drive the lab's agents through events.

Owns: these actions' arguments, help and output.  Must not: contain the logic
(:mod:`multihost.lab.faults`, :mod:`multihost.lab.agents`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from multihost.cli.common import add_json_flag, print_json
from multihost.control import ControlError, request
from multihost.lab import agents, faults
from multihost.lab.state import LabError, LabState

Action = Callable[[str, str, str, Callable[..., int]], Any]
StateOf = Callable[[argparse.Namespace], LabState]

FAIL = """\
Fail a node on purpose.  --how crash (default) SIGKILLs the node's agent: the kernel drops
its owner-flagged nft table at once, so the node stops answering, and the other agents take
its share after dead_after_ms without heartbeats.  --how link sets the node's cluster
interface down (the agent keeps running, cut off).  'lab recover NODE' undoes it.
"""

RECOVER = """\
Undo 'lab fail NODE': restart the node's agent (after a crash) or bring its link back up.
The recovered node takes back exactly its share, from every other member equally, only
after they have released it (release before take).
"""

DRAIN = """\
Planned maintenance: the node gives away all its buckets but keeps serving the connections
it has (conntrack-aware handover); the other members take only new connections.  'lab
status'/'multihost status' shows how many flows remain.  'lab undrain NODE' takes it back.
"""


def register_actions(action: Action, state_of: StateOf) -> None:
    a = action("fail", "fail a node (crash its agent or cut its link)", FAIL, _fail(state_of))
    a.add_argument("node", metavar="NODE")
    a.add_argument("--how", choices=faults.HOWS, default="crash", help="default: crash")
    add_json_flag(a)
    a = action("recover", "recover a failed node", RECOVER, _recover(state_of))
    a.add_argument("node", metavar="NODE")
    add_json_flag(a)
    for name, helptext in (
        ("drain", "drain a node for maintenance"),
        ("undrain", "end a node's drain"),
    ):
        a = action(name, helptext, DRAIN, _drain(state_of, name))
        a.add_argument("node", metavar="NODE")
        add_json_flag(a)


def _fail(state_of: StateOf) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        entry = faults.fail(state_of(args), args.node, args.how)
        if args.json:
            print_json(entry)
        else:
            print(f"node {args.node} failed ({args.how})")
        return 0

    return run


def _recover(state_of: StateOf) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        entry = faults.recover(state_of(args), args.node)
        if args.json:
            print_json(entry)
        else:
            print(f"node {args.node} recovered (was: {entry['how']})")
        return 0

    return run


def _drain(state_of: StateOf, cmd: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        state = state_of(args)
        if args.node not in state.topology.members:
            raise LabError(f"unknown node {args.node!r}")
        try:
            reply = request(agents.control_socket(state, args.node), cmd)
        except ControlError as e:
            raise LabError(f"agent {args.node}: {e}") from None
        reply.pop("ok", None)
        # what 'lab probe' predicts with: a drained node takes no share
        if cmd == "drain":
            state.live = [m for m in state.live if m != args.node]
        elif args.node not in faults.failed(state):
            state.live = [m for m in state.topology.members if m in state.live or m == args.node]
        state.save()
        if args.json:
            print_json({"node": args.node, **reply})
        else:
            print(f"node {args.node}: {cmd} requested")
        return 0

    return run
