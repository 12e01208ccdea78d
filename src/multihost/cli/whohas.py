"""``multihost whohas``: predict the bucket and owner of one flow, as the kernel would.

Must not: touch the kernel; uses :mod:`multihost.flowhash` and :mod:`multihost.assignment`.
"""

from __future__ import annotations

import argparse

from multihost.assignment import assign, default_table, slots_of
from multihost.cli.common import Formatter, UsageError, add_json_flag, print_json
from multihost.flowhash import FlowError, HashMode, flow_bucket, parse_flow
from multihost.simulation import SimulationError, parse_members

DESCRIPTION = """\
Compute the bucket the nftables rule 'jhash ... mod B seed S' gives a flow and the member
that owns that bucket for the given live set.  The flow is written as the client sends it:
SRC:PORT-DST:PORT (IPv6: [SRC]:PORT-[DST]:PORT).  Member i (in --members order) occupies
slot i; a live cluster's members and seed are printed by 'multihost lab up --json'.

example:
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
    p.add_argument("--members", required=True, metavar="A,B,...", help="1-8 member names")
    p.add_argument("--live", metavar="A,B,...", help="live members (default: all)")
    p.add_argument("--seed", required=True, type=_seed, help="the hash seed (32-bit)")
    p.add_argument("--flow", required=True, metavar="SRC:PORT-DST:PORT", help="the flow")
    p.add_argument(
        "--proto",
        default="tcp",
        choices=["tcp", "udp", "sctp", "icmp", "icmpv6"],
        help="transport protocol (default tcp; icmp hashes the addresses only)",
    )
    p.add_argument(
        "--hash",
        default=HashMode.FOUR_TUPLE.value,
        choices=[m.value for m in HashMode],
        help="hash mode of the group (default 4-tuple)",
    )
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        members = parse_members(args.members)
        live_names = parse_members(args.live, "--live") if args.live else members
        flow = parse_flow(args.flow, args.proto)
    except (SimulationError, FlowError) as e:
        raise UsageError(str(e)) from None
    unknown = [n for n in live_names if n not in members]
    if unknown:
        raise UsageError(f"--live: unknown member {unknown[0]!r} (members: {','.join(members)})")
    live = slots_of(live_names, members)
    table = default_table()
    bucket = flow_bucket(flow, table.buckets, args.seed, HashMode(args.hash))
    slot = assign(live, table).owner(bucket)
    owner = None if slot is None else members[slot]
    if args.json:
        print_json({"bucket": bucket, "buckets": table.buckets, "owner": owner})
    else:
        print(f"bucket {bucket} of {table.buckets}: owner {owner or '(none: no member live)'}")
    return 0
