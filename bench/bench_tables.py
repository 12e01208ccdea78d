"""Benchmark: what the table kind costs the data planes -- ruleset size and kernel update
time of a view change, ``[cluster] table = "factorial"`` against ``"minimal"``, side by side.

Run (root): .venv/bin/python bench/bench_tables.py [--members 2,4,8] [--rounds 30]
            [--json FILE]

For every group size ``n`` of ``--members`` and both table kinds, the benchmark plays node
slot 0 of an ``n``-member group on both data planes, each in a namespace of its own
(``mhtB-<pid>-<role>``, deleted at the end): it installs the state with every member live,
then ``--rounds`` times fails and recovers the next other member (1, 2, ..., n-1, 1, ...),
each view change applied by the agent's own code (:class:`multihost.dataplane.nft.Dataplane`
netlink element delta in one transaction; :class:`multihost.dataplane.xdp.XdpDataplane`
inactive table half and flip).  The rounds interleave every case, so a noisy machine hits
them alike.  Reported per case: buckets; the ranges node 0 owns with every member live
(the owned set's intervals); the size of ``nft list table`` (bytes); install time; update
time p50 / p99 (render + apply, ms) and buckets moved per update; the XDP bucket table
bytes (two halves).  ``update x`` is factorial / minimal of the p50 update time.

Must not: touch anything but its own namespaces, or edit ``src``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import dp_net
from multihost.assignment import OrderingTable, assign
from multihost.dataplane.nft import Dataplane, Nft
from multihost.dataplane.ruleset import GroupBuckets, GroupSpec, RulesetSpec
from multihost.dataplane.xdp import XdpDataplane
from multihost.tablechoice import TABLE_KINDS, table_for

VIP = "198.19.0.1"
SEED = 0x2B7E1516
GROUP = "bench"
NODE = 0


@dataclass
class Case:
    kind: str
    members: int
    backend: str
    table: OrderingTable
    plane: Dataplane | XdpDataplane | None = None
    install_ms: float = 0.0
    update_ms: list[float] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)
    victim: int = 0

    @property
    def role(self) -> str:  # the namespace and veth suffix (IFNAMSIZ: short)
        return f"{self.kind[0]}{self.members}{self.backend}"

    def owned(self, live: frozenset[int]) -> GroupBuckets:
        return GroupBuckets(owned=assign(live, self.table).buckets(NODE))


def spec(buckets: int) -> RulesetSpec:
    group = GroupSpec(GROUP, (ipaddress.IPv4Address(VIP),))
    return RulesetSpec(buckets=buckets, seed=SEED, groups=(group,))


def ruleset_bytes(ns: str, table: str) -> int:
    return len(dp_net.ns_run(ns, "nft", "list", "table", "inet", table).encode())


def run(members: list[int], rounds: int) -> dict[str, Any]:
    cases = [
        Case(kind, n, backend, table_for(n, kind))
        for n in members
        for kind in TABLE_KINDS
        for backend in ("nft", "xdp")
    ]
    lab = dp_net.Lab(vip=VIP, dport=9000, pool="198.18.200.0/24")
    bpffs: Path | None = None
    out: dict[str, Any] = {"cases": []}
    try:
        lab.open([c.role for c in cases])
        bpffs = dp_net.mount_bpffs()
        for c in cases:
            ns = lab.receivers[c.role]
            s = spec(c.table.buckets)
            c.plane = (
                Dataplane(s, Nft(netns=ns))
                if c.backend == "nft"
                else XdpDataplane(s, "r0", bpffs / c.role, netns=ns, mode="generic")
            )
            c.install_ms = c.plane.install({GROUP: c.owned(frozenset(range(c.members)))}) * 1e3
        for _ in range(rounds):
            for c in cases:
                if c.members < 2:
                    continue
                assert c.plane is not None
                c.victim = c.victim % (c.members - 1) + 1
                everyone = frozenset(range(c.members))
                for live in (everyone - {c.victim}, everyone):
                    st = c.plane.update({GROUP: c.owned(live)})
                    c.update_ms.append(st.seconds * 1e3)
                    c.changed.append(st.added + st.removed)
        for c in cases:
            ns = lab.receivers[c.role]
            row: dict[str, Any] = {
                "kind": c.kind,
                "members": c.members,
                "backend": c.backend,
                "table": c.table.name,
                "buckets": c.table.buckets,
                "owned_ranges_all_live": len(
                    assign(frozenset(range(c.members)), c.table).ranges(NODE)
                ),
                "install_ms": round(c.install_ms, 2),
                "updates": len(c.update_ms),
            }
            if c.update_ms:
                ms = sorted(c.update_ms)
                row["update_ms_p50"] = round(statistics.median(ms), 3)
                row["update_ms_p99"] = round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 3)
                row["moved_per_update"] = round(statistics.mean(c.changed), 1)
            if c.backend == "nft":
                assert isinstance(c.plane, Dataplane)
                row["ruleset_bytes"] = ruleset_bytes(ns, c.plane.spec.table)
            else:
                row["table_bytes"] = 2 * c.table.buckets  # two halves, one byte per bucket
            out["cases"].append(row)
    finally:
        for c in cases:
            if isinstance(c.plane, Dataplane):
                try:
                    c.plane.remove()
                finally:
                    c.plane.nft.close()
            elif c.plane is not None:
                c.plane.remove()
        lab.close()
        if bpffs is not None:
            dp_net.unmount_bpffs(bpffs)
    return out


def report(data: dict[str, Any]) -> str:
    rows = data["cases"]
    by = {(r["kind"], r["members"], r["backend"]): r for r in rows}
    lines = [
        "| members | backend | table | buckets | owned ranges | size (bytes) | install ms |"
        " update ms p50 / p99 | buckets moved/update | update x |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        size = r.get("ruleset_bytes", r.get("table_bytes"))
        fact = by.get(("factorial", r["members"], r["backend"]))
        ratio = ""
        if r["kind"] == "minimal" and fact and r.get("update_ms_p50") and fact.get("update_ms_p50"):
            ratio = f"{fact['update_ms_p50'] / r['update_ms_p50']:.1f}"
        upd = f"{r['update_ms_p50']} / {r['update_ms_p99']}" if "update_ms_p50" in r else "-"
        lines.append(
            f"| {r['members']} | {r['backend']} | {r['table']} | {r['buckets']:,} |"
            f" {r['owned_ranges_all_live']} | {size:,} | {r['install_ms']} | {upd} |"
            f" {r.get('moved_per_update', '-')} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--members", default="2,4,8", help="group sizes (default 2,4,8)")
    ap.add_argument("--rounds", type=int, default=30, help="fail+recover cycles per case")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args()
    members = [int(x) for x in args.members.split(",")]
    started = time.time()
    data = run(members, args.rounds)
    data["command"] = (
        f".venv/bin/python bench/bench_tables.py --members {args.members} --rounds {args.rounds}"
    )
    data["load"] = dp_net.run("cat", "/proc/loadavg").split()[:3]
    data["seconds"] = round(time.time() - started, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    print(report(data))
    print(f"load {' '.join(data['load'])}; {data['seconds']} s; {data['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
