"""``multihost simulate``: the assignment engine through fail/recover events, no network.

Must not: touch the kernel; all logic lives in :mod:`multihost.simulation`.
"""

from __future__ import annotations

import argparse
from typing import Any

from multihost.cli.common import Formatter, UsageError, add_json_flag, print_json, render_table
from multihost.cli.groupsel import (
    add_config_args,
    add_members_args,
    conflicts,
    from_config,
    from_members,
)
from multihost.flowhash import HashMode
from multihost.simulation import (
    Simulation,
    SimulationError,
    fraction_text,
    parse_event,
    simulate,
)

DESCRIPTION = """\
Show how the hash space is shared by the members of one traffic IP group, starting with all
members live and applying each --event in order.  For every step it prints the live set,
each live member's exact share, the fraction of the hash space that moved, and the
transfers (from, to, share).

With --config FILE the group's members sit in their configured [[node]].slot (the group is
--group, or the only one), exactly as the agents assign it.  With --members, member i (in
--members order) occupies slot i unless --slots gives each member's slot, and weighs 1
unless --weights says otherwise (a member of weight k holds k table slots: k times the
share).  The table is chosen as the agents choose it: all 8! orderings (40,320 buckets) up
to 8 slots, the exactly min-wise family of lcm(1..n) orderings for 9..16 (n = the highest
slot + 1, or the sum of the weights).

examples (the feature brief's worked example):
  multihost simulate --members A,B,C,D --event fail:D --event fail:C --event recover:D
  multihost simulate --config /etc/multihost/multihost.toml --group web --event fail:B
  multihost simulate --members A,B,C,D,E,F,G,H,I,J,K,L --event fail:L --json
  multihost simulate --members A,B,C --weights A=2 --event fail:A
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "simulate",
        help="replay fail/recover events through the assignment engine",
        description=DESCRIPTION,
        formatter_class=Formatter,
    )
    add_config_args(p)
    add_members_args(p)
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
        "table": sim.table,
        "slots": dict(zip(sim.members, sim.slots, strict=True)),
        "weights": dict(zip(sim.members, sim.weights, strict=True)),
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
    placed = ",".join(f"{m}@{s}" for m, s in zip(sim.members, sim.slots, strict=True))
    out: list[str] = [
        f"hash space: {sim.buckets} buckets (table {sim.table}), members (at slot) {placed}"
    ]
    if any(w != 1 for w in sim.weights):
        weights = ",".join(f"{m}={w}" for m, w in zip(sim.members, sim.weights, strict=True))
        out.append(f"weights: {weights}")
    for st in sim.steps:
        out.append("")
        out.append(f"== {st.event}: live {','.join(st.live) or '(none)'}")
        rows = [
            [
                m,
                fraction_text(st.shares[m]) if m in st.shares else "-",
                str(st.assignment.count(i)),
                "live" if m in st.shares else "failed",
                str(i),
            ]
            for m, i in zip(sim.members, sim.slots, strict=True)
        ]
        out.append(render_table(["member", "share", "buckets", "state", "slot"], rows))
        out.append(f"moved: {fraction_text(st.moved)} of the hash space")
        for t in st.transfers:
            out.append(f"  {t.source} -> {t.target}: {fraction_text(t.share)}")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    conflicts(args, {"--slots": args.slots, "--weights": args.weights, "--table": args.table})
    if args.config:
        group = from_config(args.config, args.group)
    else:
        group = from_members(args, HashMode.FOUR_TUPLE, None)
    try:
        events = [parse_event(e) for e in args.event]
        sim = simulate(
            group.members,
            events,
            table=group.table,
            slots=[group.slots[m] for m in group.members],
            weights=[group.weights[m] for m in group.members],
        )
    except SimulationError as e:
        raise UsageError(str(e)) from None
    if args.json:
        out = to_json(sim)
        if group.name is not None:
            out["group"] = group.name
        if group.config is not None:
            out["config"] = group.config.source
        print_json(out)
    else:
        if group.name is not None and group.config is not None:
            print(f"group {group.name} of {group.config.source}")
        print(to_text(sim))
    return 0
