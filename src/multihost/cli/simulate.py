"""``multihost simulate``: the assignment engine through fail/recover events, no network.

Must not: touch the kernel; all logic lives in :mod:`multihost.simulation`.
"""

from __future__ import annotations

import argparse
from typing import Any

from multihost.cli.common import Formatter, UsageError, add_json_flag, print_json, render_table
from multihost.simulation import (
    Simulation,
    SimulationError,
    fraction_text,
    parse_event,
    parse_members,
    simulate,
)

DESCRIPTION = """\
Show how the hash space is shared by the members of one traffic IP group, starting with all
members live and applying each --event in order.  For every step it prints the live set,
each live member's exact share, the fraction of the hash space that moved, and the
transfers (from, to, share).  Member i (in --members order) occupies slot i.

example (the feature brief's worked example):
  multihost simulate --members A,B,C,D --event fail:D --event fail:C --event recover:D
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "simulate",
        help="replay fail/recover events through the assignment engine",
        description=DESCRIPTION,
        formatter_class=Formatter,
    )
    p.add_argument("--members", required=True, metavar="A,B,...", help="1-8 member names")
    p.add_argument(
        "--event",
        action="append",
        default=[],
        metavar="fail:NAME|recover:NAME",
        help="an event, applied in order (repeatable)",
    )
    add_json_flag(p)
    p.set_defaults(func=run)


def to_json(sim: Simulation) -> dict[str, Any]:
    return {
        "buckets": sim.buckets,
        "steps": [
            {
                "event": st.event,
                "live": list(st.live),
                "shares": {m: fraction_text(f) for m, f in st.shares.items()},
                "moved": fraction_text(st.moved),
                "transfers": [
                    {"from": t.source, "to": t.target, "share": fraction_text(t.share)}
                    for t in st.transfers
                ],
            }
            for st in sim.steps
        ],
    }


def to_text(sim: Simulation) -> str:
    out: list[str] = [f"hash space: {sim.buckets} buckets, members {','.join(sim.members)}"]
    for st in sim.steps:
        out.append("")
        out.append(f"== {st.event}: live {','.join(st.live) or '(none)'}")
        rows = [
            [
                m,
                fraction_text(st.shares[m]) if m in st.shares else "-",
                str(st.assignment.count(i)),
                "live" if m in st.shares else "failed",
            ]
            for i, m in enumerate(sim.members)
        ]
        out.append(render_table(["member", "share", "buckets", "state"], rows))
        out.append(f"moved: {fraction_text(st.moved)} of the hash space")
        for t in st.transfers:
            out.append(f"  {t.source} -> {t.target}: {fraction_text(t.share)}")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    try:
        members = parse_members(args.members)
        events = [parse_event(e) for e in args.event]
        sim = simulate(members, events)
    except SimulationError as e:
        raise UsageError(str(e)) from None
    if args.json:
        print_json(to_json(sim))
    else:
        print(to_text(sim))
    return 0
