"""``multihost drain|undrain``: planned maintenance of the local node.

Must not: contain agent logic; it sends one control request and reports.
"""

from __future__ import annotations

import argparse
import sys
import time

from multihost.cli.common import Formatter, OperationError, UsageError, add_json_flag, print_json
from multihost.cli.status import add_socket_args, socket_path
from multihost.control import ControlError, request

DESCRIPTION = """\
drain: the node gives away every bucket of every traffic IP group through the
connection-preserving handover: the other members take all NEW connections at once, while
this node keeps serving the connections it already has.  'multihost status' shows how many
flows remain and the time left (cluster.max_drain_ms).  When none remain (or with --wait,
when this command returns), the node can be stopped without any client noticing.  The
drained flag travels in the heartbeats, so every member knows.

undrain: take the node's share back (from each other member equally, release before take).

NODE, if given, must be the node the local agent runs (a safety check).
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, helptext in (
        ("drain", "drain this node for maintenance"),
        ("undrain", "end this node's drain"),
    ):
        p = sub.add_parser(name, help=helptext, description=DESCRIPTION, formatter_class=Formatter)
        p.add_argument("node", nargs="?", metavar="NODE", help="the local node's name (check)")
        add_socket_args(p)
        if name == "drain":
            p.add_argument(
                "--wait",
                action="store_true",
                help="return only when no flow is left (or max_drain_ms passed)",
            )
            p.add_argument(
                "--timeout",
                type=float,
                default=3600.0,
                metavar="S",
                help="give up waiting after S seconds (default 3600)",
            )
        add_json_flag(p)
        p.set_defaults(func=run, command_name=name)


def run(args: argparse.Namespace) -> int:
    path = socket_path(args)
    try:
        st = request(path, "status")
        if args.node and args.node != st["node"]:
            raise UsageError(f"the local agent is node {st['node']!r}, not {args.node!r}")
        request(path, args.command_name)
        if args.command_name == "drain" and args.wait:
            deadline = time.monotonic() + args.timeout
            while True:
                st = request(path, "status")
                h = st.get("handover", {})
                if not h.get("draining_buckets") and not any(
                    g["owned"]["buckets"] for g in st["groups"].values()
                ):
                    break
                if time.monotonic() > deadline:
                    raise OperationError(
                        f"drain: timed out after {args.timeout:g} s waiting for"
                        f" {h.get('flows_draining')} flows in {h.get('draining_buckets')} buckets"
                    )
                print(
                    f"drain: {h.get('flows_draining')} flows left in "
                    f"{h.get('draining_buckets')} buckets, {h.get('time_left_s')} s left",
                    file=sys.stderr if args.json else sys.stdout,
                    flush=True,
                )
                time.sleep(1.0)
        st = request(path, "status")
    except ControlError as e:
        raise OperationError(str(e)) from None
    h = st.get("handover", {})
    out = {"node": st["node"], "draining": args.command_name == "drain", **h}
    if args.json:
        print_json(out)
    else:
        print(
            f"node {st['node']}: {args.command_name} requested; "
            f"{h.get('draining_buckets', 0)} buckets still draining"
            f" ({h.get('flows_draining')} flows)"
        )
    return 0
