"""``multihost backend-routes``: a back end's per-node return routes — print, apply, remove.

Must not: hold the rules of what a back end needs (``backends`` validates, ``backendplan``
renders) or talk netlink itself (``dataplane.backendroutes``); without --apply/--remove it
changes nothing and needs no root.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from multihost import preflight
from multihost.backendplan import Plan, plan, render_json, render_text, step_json
from multihost.backends import find_backend
from multihost.cli.common import (
    Formatter,
    OperationError,
    UsageError,
    add_json_flag,
    print_json,
)
from multihost.config import ConfigError

DESCRIPTION = """\
With IP transparency a back end sees each client's own address, so its replies must go
back through the node that holds the connection.  Each node reaches the back end on an
address of its own ([[backend]].addresses, one per node), and the back end routes replies
by their source address: for the node in slot s,

  ip rule from <the back end's address for that node> lookup <table_base + s>
  table table_base + s: default via <that node's backend_gateway>

This command prints those steps for the back end called NAME (addresses on its interface,
then per node the table's default route and the rule), as `ip` commands to paste as root
on the back end, from the cluster's configuration file (the same validation as
check-config; the key file is not needed).  Run on the back end itself:

  --apply   adds what is missing, in order, and reports each step "added" or "present";
            applying twice changes nothing the second time.  It refuses, before changing
            anything, what would clash (the address on another interface or with another
            prefix length, another default route in a node's table, another rule for a
            node's source address).
  --remove  deletes exactly the plan's steps that are present, in reverse order
            ("removed" or "absent"); after --apply it leaves the back end as it was.
            It refuses to delete a primary IPv4 address that would take foreign
            secondary addresses with it.

Both need root (CAP_NET_ADMIN).  See docs/transparency.md.

--json prints one object: {"ok": true, "backend", "interface", "family", "action":
"plan"|"apply"|"remove", "nodes": [{"node", "slot", "address", "gateway", "table",
"priority"}], "steps": [{"kind": "address"|"route"|"rule", "node", "command", ...,
"result"}], "changed": N}; "result" and "changed" only with --apply/--remove.

examples:
  multihost backend-routes --config /etc/multihost/multihost.toml --backend db1
  multihost backend-routes --config multihost.toml --backend db1 --apply
  multihost backend-routes --config multihost.toml --backend db1 --remove --json
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "backend-routes",
        help="a back end's per-node return routes (IP transparency): print, apply, remove",
        description=DESCRIPTION,
        formatter_class=Formatter,
    )
    p.add_argument("--config", required=True, metavar="FILE", help="the TOML configuration")
    p.add_argument("--backend", required=True, metavar="NAME", help="the [[backend]] table's name")
    action = p.add_mutually_exclusive_group()
    action.add_argument(
        "--apply",
        action="store_true",
        help="add the missing addresses, routes and rules on this host (idempotent; root)",
    )
    action.add_argument(
        "--remove",
        action="store_true",
        help="delete the plan's addresses, routes and rules present on this host (root)",
    )
    add_json_flag(p)
    p.set_defaults(func=run)


def load_plan(path: str, name: str) -> Plan:
    """The plan of back end ``name`` in ``path`` (UsageError naming file/key/value)."""
    try:
        cfg, _ = preflight.load(path, with_key=False, host=False)
        return plan(find_backend(cfg.backends, name, cfg.source))
    except ConfigError as e:
        raise UsageError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    pl = load_plan(args.config, args.backend)
    if not (args.apply or args.remove):
        if args.json:
            print_json({"ok": True, "action": "plan", **render_json(pl)})
        else:
            print(render_text(pl), end="")
        return 0
    if os.geteuid() != 0:
        raise UsageError("backend-routes --apply/--remove needs root (addresses, routes, rules)")
    from multihost.dataplane import backendroutes

    try:
        outcomes = backendroutes.apply(pl) if args.apply else backendroutes.remove(pl)
    except backendroutes.BackendRoutesError as e:
        raise OperationError(f"backend {pl.backend!r}: {e}") from None
    verb = "add" if args.apply else "del"
    changed = sum(o.result in (backendroutes.ADDED, backendroutes.REMOVED) for o in outcomes)
    if args.json:
        out: dict[str, Any] = {
            "ok": True,
            "action": "apply" if args.apply else "remove",
            **render_json(pl, remove=args.remove),
        }
        out["steps"] = [{**step_json(o.step, verb), "result": o.result} for o in outcomes]
        out["changed"] = changed
        print_json(out)
        return 0
    width = max(len(o.result) for o in outcomes)
    for o in outcomes:
        print(f"{o.result:<{width}}  {o.step.command(verb)}")
    done = "added" if args.apply else "removed"
    print(f"# back end {pl.backend!r}: {changed} {done}, {len(outcomes) - changed} unchanged")
    return 0
