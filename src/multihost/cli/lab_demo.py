"""``multihost lab demo``: the worked example (A-D; fail D, fail C, recover D) with real
packets, measured shares against theory and measured failover times.

Owns: the action's arguments, help, the per-step tables and the JSON object.  Must not:
contain the logic (:mod:`multihost.lab.demo`) or touch a lab it did not build.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from multihost.cli.common import add_json_flag, print_json, render_table
from multihost.cli.lab_common import add_backend_option
from multihost.lab import demo, faults
from multihost.lab.naming import validate_prefix
from multihost.lab.state import require_root

Action = Callable[[str, str, str, Callable[..., int]], Any]

DEMO = f"""\
The worked example with real packets.  Builds its own 4-node lab (prefix
'{demo.DEFAULT_PREFIX}' unless --prefix), with one agent per node running the membership
protocol, then goes through: start, fail D, fail C, recover D.  At every step it waits until
all live agents agree on the live set and their buckets partition the hash space exactly,
opens CONNECTIONS TCP connections from the client and compares how many each node answered
with its exact share.  A fail step also measures the failover: from the failure instant a
new connection to the failed node's buckets every 5 ms; 'first' is when the first of them
is answered by a survivor, 'all' when the survivors' status shows they own every bucket.
One in four connections goes to the survivors' own buckets as a control.

The lab is removed at the end, also after an error or ^C.  Needs root.  Progress goes to
stderr.  Exit status 1 if a steady-state probe had a failed, duplicated (answered twice or
reset) or mispredicted connection.

--json prints {{"steps": [{{"event", "live", "expected", "observed", "connections",
"failed", "duplicates", "failover_ms", "all_served_ms", "converge_ms", "z", "chi2",
"p_value", ...}}, ...], ...}}.

examples:
  multihost lab demo
  multihost lab demo --how link --connections 5000 --json
  multihost lab demo --ipv6 --backend xdp
"""


def register_actions(action: Action, state_of: Callable[[argparse.Namespace], Any]) -> None:
    del state_of  # demo builds its own lab
    a = action("demo", "the worked example with real packets (builds its own lab)", DEMO, run)
    a.add_argument(
        "--connections",
        type=int,
        metavar="N",
        default=2000,
        help="TCP connections per step (default 2000)",
    )
    a.add_argument("--how", choices=faults.HOWS, default="crash", help="default: crash")
    add_backend_option(a)
    a.add_argument(
        "--ipv6",
        action="store_true",
        help="dual-stack lab, heartbeats on ff15::1, every connection to the IPv6 traffic IP",
    )
    add_json_flag(a)


def run(args: argparse.Namespace) -> int:
    require_root()
    prefix = validate_prefix(args.prefix or demo.DEFAULT_PREFIX)
    cfg = demo.DemoConfig(
        connections=args.connections,
        how=args.how,
        prefix=prefix,
        backend=args.backend,
        ipv6=args.ipv6,
    )

    def progress(msg: str) -> None:
        print(f"demo: {msg}", file=sys.stderr, flush=True)

    result = demo.run_demo(cfg, progress)
    bad = any(s["failed"] or s["duplicates"] or s["mispredicted"] for s in result["steps"])
    if args.json:
        print_json(result)
    else:
        render(result)
    return 1 if bad else 0


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f} ms"


def render(result: dict[str, Any]) -> None:
    for i, s in enumerate(result["steps"]):
        n = s["connections"]
        print(f"\n[{i}] {s['event']}: live {','.join(s['live'])}")
        rows = []
        for node, share in s["expected"].items():
            mean = n * Fraction(share)
            rows.append(
                [
                    node,
                    share,
                    f"{float(mean):.0f}",
                    str(s["observed"].get(node, 0)),
                    str(s["predicted"].get(node, 0)),
                    f"{s['z'][node]:+.2f}",
                ]
            )
        extra = sorted(set(s["observed"]) - set(s["expected"]))
        rows += [[x, "0", "0", str(s["observed"][x]), "0", "!"] for x in extra]
        heads = ["NODE", "SHARE", "EXPECTED", "OBSERVED", "MODEL", "Z"]
        print(render_table(heads, rows))
        print(
            f"  {n} connections: failed {s['failed']}, duplicates {s['duplicates']}, "
            f"mispredicted {s['mispredicted']}; chi-square {s['chi2']} "
            f"(df {s['df']}, p = {s['p_value']})"
        )
        fo = s.get("failover")
        if fo is not None:
            f = fo["flows"]
            print(
                f"  failover ({fo['how']}): first new connection to {fo['node']}'s buckets "
                f"answered after {_ms(s['failover_ms'])}, all its buckets owned after "
                f"{_ms(s['all_served_ms'])}"
            )
            print(
                "    per survivor (status): "
                + ", ".join(f"{k} {_ms(v)}" for k, v in fo["status_ms"].items())
            )
            print(
                f"    control connections to the survivors' own buckets: "
                f"{f['control_unanswered']} of {f['control_attempts']} unanswered"
            )
        elif s["event"] != "start":
            print(f"  converged {_ms(s['converge_ms'])} after the recovery")
    print(
        "\nEXPECTED = connections x exact share; MODEL = the flow-hash model's prediction for "
        "these very source ports; Z = (observed - expected) / binomial sd."
    )
