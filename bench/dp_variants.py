"""The data-plane benchmark's fixed scenario: what is measured, with which filters.

Owns: the addresses, ports and table constants, the targets, the variants (one receiver
namespace each), which of them run in the TCP pass and against which baseline, the flow
sets each variant is fed (picked with the kernel-exact hash model), and the filters that
are not the project's own data plane: the conntrack-only rule, the one-rule nft filter and
the xt_cluster rules of iptables-extensions(8).

Must not: create namespaces, load programs or run commands: :mod:`bench.bench_dataplane`
builds and measures what is declared here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from bench import dp_flows
from multihost.assignment import assign
from multihost.dataplane.ruleset import GroupSpec, RulesetSpec
from multihost.dataplane.rulesettables import jhash_expr
from multihost.tablechoice import table_for

VIP = "198.19.0.1"
GROUP_IP = "239.192.0.1"
DPORT = 9000
IPERF_PORT = 5201
BUCKETS = 40320  # the default ("factorial") table of 8 slots
SEED = 0x2B7E1516
SLOTS = 8
NODE = 0  # the measured node's slot
FLOWS = 16384  # per flow set (a power of two: the generator masks its counter)
GROUP = "bench"
ACCEPT_TARGET = 0.97  # accepted-path TCP throughput vs no filter
CAPACITY_TARGET = 0.95  # receive capacity vs no filter, every live-set case
XDP_TCP_TARGET = 0.98  # XDP accepted-path TCP throughput vs no filter


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    flows: str  # flow set name
    # "gen", "none", "ct", "nft", "xt", "xdp" (native), "xdpg" (generic XDP), "xdp0" (native,
    # a program that only returns XDP_PASS: the floor of any XDP filter on the accepted path)
    kind: str
    live: tuple[int, ...] = ()
    accepted: float = 1.0  # expected share of packets that reach the socket
    table: str = "factorial"  # [cluster] table: "minimal" is 840 buckets for 8 slots


_ALL = tuple(range(8))
VARIANTS = (
    Variant("gen", "generator only (XDP_DROP, calibration)", "random", "gen", accepted=0.0),
    Variant("none", "(a) no filter", "random", "none"),
    Variant("ct", "(a') conntrack only (one nft ct rule), no filter", "random", "ct"),
    Variant("min", "(m) one nft rule, hash set as in (b), no conntrack", "own2", "min", (0, 1)),
    Variant("minb", "(m') one nft rule, bitmap set, no conntrack", "own2", "minb", (0, 1)),
    Variant("nft8", "(b) multihost ruleset, 8 of 8 live, owned flows", "own8", "nft", _ALL),
    Variant("nft4", "(b) multihost ruleset, 4 of 8 live, owned flows", "own4", "nft", (0, 1, 2, 3)),
    Variant(
        "nft2", "(b) multihost ruleset, 2 of 8 live (worst), owned flows", "own2", "nft", (0, 1)
    ),
    Variant(
        "nftN", "(b) multihost ruleset, non-owner: 8 of 8, all flows", "random", "nft", _ALL, 1 / 8
    ),
    Variant("xt", "(c) xt_cluster node 1 of 8, owned flows", "xtown", "xt"),
    Variant("xtN", "(c) xt_cluster node 1 of 8, non-owner: all flows", "random", "xt", (), 1 / 8),
    Variant("xdp8", "(x) XDP program (native), 8 of 8 live, owned flows", "own8", "xdp", _ALL),
    Variant("xdp2", "(x) XDP program (native), 2 of 8 live, owned flows", "own2", "xdp", (0, 1)),
    Variant(
        "xdpN",
        "(x) XDP program (native), non-owner: 8 of 8, all flows",
        "random",
        "xdp",
        _ALL,
        1 / 8,
    ),
    Variant(
        "nft2m",
        "(b) multihost ruleset, minimal table (840 buckets), 2 of 8 live, owned flows",
        "own2m",
        "nft",
        (0, 1),
        table="minimal",
    ),
    Variant(
        "nftNm",
        "(b) multihost ruleset, minimal table, non-owner: 8 of 8, all flows",
        "random",
        "nft",
        _ALL,
        1 / 8,
        table="minimal",
    ),
    Variant(
        "xdp2m",
        "(x) XDP program (native), minimal table (840 buckets), 2 of 8 live, owned flows",
        "own2m",
        "xdp",
        (0, 1),
        table="minimal",
    ),
    Variant(
        "xdpNm",
        "(x) XDP program (native), minimal table, non-owner: 8 of 8, all flows",
        "random",
        "xdp",
        _ALL,
        1 / 8,
        table="minimal",
    ),
    Variant("xdp0", "(x0) floor: XDP program that only passes (native)", "random", "xdp0"),
    Variant("xdpg", "(x') XDP program (generic), owns every bucket", "random", "xdpg", _ALL),
    Variant("xdpgN", "(x') XDP program (generic), owns no bucket", "random", "xdpg", (), 0.0),
)
TCP_VARIANTS = ("none", "nft2", "xt", "xdpg", "wnone", "wxdp")
# The baseline each TCP variant's ratio is taken against: the emulated-NIC pair ("w": frames
# reach r0 one MTU segment at a time through an XDP wire, see dp_net.Lab.wire) against the
# same wire without a filter; the others against plain veth without a filter.
TCP_BASE = {"wnone": "wnone", "wxdp": "wnone"}
WIRE_ROLES = ("wnone", "wxdp")
XDP_KINDS = ("xdp", "xdpg")
# The second, short pass with few flows (everything cache-hot): what is cache misses.
FEW_FLOWS = 256
FEW_KEYS = ("gen", "none", "ct", "min", "minb", "nft2")


def spec(kind: str = "factorial") -> RulesetSpec:
    group = GroupSpec(GROUP, (ipaddress.IPv4Address(VIP),))
    return RulesetSpec(buckets=table_for(SLOTS, kind).buckets, seed=SEED, groups=(group,))


def owned(live: tuple[int, ...], kind: str = "factorial") -> frozenset[int]:
    return assign(live, table_for(SLOTS, kind)).buckets(NODE)


def owned_mask(buckets: frozenset[int], size: int = BUCKETS) -> npt.NDArray[np.bool_]:
    mask = np.zeros(size, dtype=bool)
    mask[np.fromiter(buckets, dtype=np.int64)] = True
    return mask


def flow_sets(rng: np.random.Generator, n: int) -> dict[str, dp_flows.FlowSet]:
    vip = ipaddress.IPv4Address(VIP).packed
    sets = {"random": dp_flows.pick("random", rng, n, lambda s, p: np.ones(len(p), bool))}
    for name, live, kind in (
        ("own8", tuple(range(8)), "factorial"),
        ("own4", (0, 1, 2, 3), "factorial"),
        ("own2", (0, 1), "factorial"),
        ("own2m", (0, 1), "minimal"),
    ):
        size = table_for(SLOTS, kind).buckets
        mask = owned_mask(owned(live, kind), size)

        def keep(
            s: npt.NDArray[np.uint8],
            p: npt.NDArray[np.uint16],
            m: npt.NDArray[np.bool_] = mask,
            size: int = size,
        ) -> npt.NDArray[np.bool_]:
            return m[dp_flows.nft_buckets(s, p, vip, DPORT, buckets=size, seed=SEED)]

        sets[name] = dp_flows.pick(name, rng, n, keep)
    sets["xtown"] = dp_flows.pick(
        "xtown", rng, n, lambda s, p: dp_flows.xt_cluster_nodes(s, SLOTS, SEED) == 0
    )
    return sets


CT_ONLY = """table inet mhtB_ct {
\tchain pre {
\t\ttype filter hook prerouting priority -250; policy accept;
\t\tct state invalid continue
\t}
}
"""


def min_filter(buckets: frozenset[int], bitmap: bool = False) -> str:
    """The filter primitive alone: one jhash + set lookup rule at -300, no conntrack.

    ``bitmap``: a 16-bit key (``typeof ct zone``), for which the kernel picks its bitmap set
    (the hand-built filters of earlier measurements); else the project's 32-bit key with a
    fixed ``size`` (the kernel's fixed-size hash set).
    """
    g = spec().groups[0]
    h = jhash_expr(spec(), g, 4, has_ports=True)
    elems = ", ".join(str(b) for b in sorted(buckets))
    key = "typeof ct zone;" if bitmap else f"typeof meta length; size {BUCKETS};"
    return (
        "table inet mhtB_min {\n"
        f"\tset owned {{ {key} elements = {{ {elems} }} }}\n"
        "\tchain pre {\n\t\ttype filter hook prerouting priority -300; policy accept;\n"
        f"\t\tip daddr {VIP} meta l4proto udp {h} @owned meta pkttype set host accept\n"
        f"\t\tip daddr {VIP} drop\n\t}}\n}}\n"
    )


def xt_rules() -> list[list[str]]:
    """The iptables-extensions(8) ``cluster`` example, for node 1 of 8."""
    return [
        [
            "-i", "r0", "-d", VIP, "-m", "cluster", "--cluster-total-nodes", str(SLOTS),
            "--cluster-local-node", "1", "--cluster-hash-seed", f"{SEED:#x}",
            "-j", "MARK", "--set-mark", "0xffff",
        ],
        ["-i", "r0", "-d", VIP, "-m", "mark", "!", "--mark", "0xffff", "-j", "DROP"],
    ]  # fmt: skip
