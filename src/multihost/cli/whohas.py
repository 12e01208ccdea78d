"""``multihost whohas``: predict the bucket and owner of one flow, as the kernel would.

Must not: touch the kernel; uses :mod:`multihost.flowhash` and :mod:`multihost.ownership`
(the function the agent's targets come from).  With ``--config`` and no ``--live`` it asks
the running agent for its live view over the control socket.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from multihost.assignment import PreferenceTable, assign
from multihost.cli.common import Formatter, OperationError, UsageError, add_json_flag, print_json
from multihost.cli.groupsel import (
    Group,
    add_config_args,
    add_members_args,
    conflicts,
    from_config,
    from_members,
)
from multihost.control import ControlError, request
from multihost.flowhash import RETURN_MODES, Flow, FlowError, HashMode, flow_bucket, parse_flow
from multihost.ownership import bucket_owner
from multihost.simulation import SimulationError, fraction_text, parse_members
from multihost.tablechoice import table_identity

DESCRIPTION = """\
Compute the bucket the nftables rule 'jhash ... mod B seed S' gives a flow and the member
that owns that bucket for a live set.  The flow is written as the client sends it:
SRC:PORT-DST:PORT (IPv6: [SRC]:PORT-[DST]:PORT).

With --config FILE the members, their [[node]].slot, the seed and the group's hash mode
come from the configuration (the group is --group, else the group whose traffic IP is the
flow's destination, else the only group).  Without --live the live set is the running
agent's (its control socket: --socket, else cluster.control_socket); the output says where
the live set came from.  Exit status 1 if no agent answers (pass --live to compute without).

The explicit form --members A,B,... --seed S [--slots ...] states everything by hand; member
i sits in slot i unless --slots says otherwise (members B,D of a 4-node cluster with slots
0-3 are '--members B,D --slots 1,3').  Without --live every member is live.

examples:
  multihost whohas --config /etc/multihost/multihost.toml \\
      --flow 198.18.0.2:40000-198.18.0.100:80
  multihost whohas --config /etc/multihost/multihost.toml --live A,C \\
      --flow 198.18.0.2:40000-198.18.0.100:80 --json
  multihost whohas --members A,B,C,D --live A,B,C --seed 0x5eed1234 \\
      --flow 198.18.0.2:40000-198.18.0.100:80
"""


def _seed(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        msg = f"seed {text!r} is not an integer (e.g. 0x5eed1234)"
        raise argparse.ArgumentTypeError(msg) from None
    if not 0 <= value <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"seed {text!r} is not a 32-bit value")
    return value


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "whohas",
        help="predict which member answers a flow",
        description=DESCRIPTION,
        formatter_class=Formatter,
    )
    add_config_args(p)
    add_members_args(p)
    p.add_argument(
        "--live",
        metavar="A,B,...",
        help="live members (default: the agent's view with --config, else all)",
    )
    p.add_argument("--seed", type=_seed, help="the hash seed (32-bit; with --members)")
    p.add_argument("--flow", required=True, metavar="SRC:PORT-DST:PORT", help="the flow")
    p.add_argument(
        "--proto",
        default="tcp",
        choices=["tcp", "udp", "sctp", "icmp", "icmpv6"],
        help="transport protocol (default tcp; icmp hashes the addresses only)",
    )
    p.add_argument(
        "--hash",
        choices=[m.value for m in HashMode],
        metavar="MODE",
        help="hash mode of the group (with --members; default 4-tuple): "
        + ", ".join(m.value for m in HashMode),
    )
    p.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="agent control socket (default: cluster.control_socket of --config)",
    )
    add_json_flag(p)
    p.set_defaults(func=run)


def agent_live(group: Group, socket: Path | None) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The live members of ``group`` as the running agent sees them, and where it came from."""
    cfg = group.config
    assert cfg is not None and group.name is not None
    path = socket if socket is not None else cfg.cluster.control_socket
    try:
        st = request(path, "status")
    except ControlError as e:
        raise OperationError(f"{e}; pass --live A,B,... to compute without the agent") from None
    if st.get("cluster") != cfg.cluster.name:
        raise OperationError(
            f"the agent at {path} runs cluster {st.get('cluster')!r},"
            f" not {cfg.cluster.name!r} of {cfg.source}"
        )
    name = group.front or group.name  # a return group follows its front group's live set
    g = st.get("groups", {}).get(name)
    if g is None:
        raise OperationError(f"the agent at {path} has no group {name!r}")
    want_hash = group.mode.value
    if group.front is not None:
        want_hash = next((f.value for f, r in RETURN_MODES.items() if r is group.mode), "")
    if list(g.get("members", [])) != list(group.members) or g.get("hash") != want_hash:
        raise OperationError(
            f"the agent at {path} runs group {group.name!r} with members"
            f" {','.join(g.get('members', []))} hash {g.get('hash')}: not what {cfg.source}"
            " says (restart it, or pass --live)"
        )
    source = {"live_source": "agent", "agent_node": st.get("node"), "socket": str(path)}
    return tuple(g["live"]), source


def lookup(
    group: Group, live: Iterable[str], flow: Flow, table: PreferenceTable | None = None
) -> tuple[int, str | None]:
    """The flow's bucket and its owner among the ``live`` members of ``group``."""
    tbl = table or group.table
    assert group.seed is not None
    bucket = flow_bucket(flow, tbl.buckets, group.seed, group.mode)
    return bucket, bucket_owner(group.slots, group.members, live, bucket, tbl)


def run(args: argparse.Namespace) -> int:
    conflicts(
        args,
        {
            "--slots": args.slots,
            "--seed": args.seed,
            "--hash": args.hash,
            "--weights": args.weights,
            "--table": args.table,
        },
    )
    try:
        flow = parse_flow(args.flow, args.proto)
    except FlowError as e:
        raise UsageError(str(e)) from None
    if args.config:
        group = from_config(args.config, args.group, flow.daddr)
    else:
        if args.seed is None:
            raise UsageError("--seed is required with --members (or use --config)")
        if args.socket is not None:
            raise UsageError("--socket needs --config (the agent's view is of a configuration)")
        group = from_members(args, HashMode(args.hash or HashMode.FOUR_TUPLE.value), args.seed)
    known = group.config.slots if group.config is not None else group.slots
    source: dict[str, Any]
    if args.live:
        try:
            live = parse_members(args.live, "--live")
        except SimulationError as e:
            raise UsageError(str(e)) from None
        unknown = [n for n in live if n not in known]
        if unknown:
            raise UsageError(f"--live: unknown member {unknown[0]!r} (members: {','.join(known)})")
        source = {"live_source": "--live"}
    elif group.config is not None:
        live, source = agent_live(group, args.socket)
    else:
        live, source = group.members, {"live_source": "all"}
    table = group.table
    bucket, owner = lookup(group, live, flow, table)
    live_members = [m for m in group.members if m in set(live)]
    own = assign(frozenset(group.slots[m] for m in live_members), table)
    shares = {m: fraction_text(own.share(group.slots[m])) for m in live_members}
    if args.json:
        out: dict[str, Any] = {"bucket": bucket, "buckets": table.buckets, "owner": owner}
        out.update(
            slot=None if owner is None else group.slots[owner],
            group=group.name,
            live=live_members,
            slots=dict(group.slots),
            table=table_identity(table).name,
            weights=dict(group.weights),
            shares=shares,
            seed=f"{group.seed:#010x}",
            hash=group.mode.value,
            **source,
        )
        if group.config is not None:
            out["config"] = group.config.source
        if group.note:
            out["note"] = group.note
        print_json(out)
        return 0
    who = f"owner {owner} (slot {group.slots[owner]})" if owner else "owner (none: no member live)"
    print(f"bucket {bucket} of {table.buckets} (table {table_identity(table).name}): {who}")
    where = {
        "agent": f"the agent on node {source.get('agent_node')} ({source.get('socket')})",
        "--live": "--live",
        "all": "all members (no --live)",
    }[source["live_source"]]
    print(
        f"  {'group ' + group.name + ', ' if group.name else ''}live "
        f"{','.join(live_members) or '(none)'} from {where}; hash {group.mode.value}"
        f" seed {group.seed:#010x}"
    )
    weighted = any(w != 1 for w in group.weights.values())
    print(
        "  shares "
        + ", ".join(
            f"{m} {s}" + (f" (weight {group.weights[m]})" if weighted else "")
            for m, s in shares.items()
        )
    )
    if group.note:
        print(f"  note: {group.note}")
    return 0
