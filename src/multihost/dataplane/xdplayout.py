"""The XDP program's interface, declared once: map names, key/value layouts, constants.

Owns: every number and byte layout that the XDP program (``bpf/multihost_xdp.c``) and its
Python loader (:mod:`multihost.dataplane.xdp`, :mod:`~multihost.dataplane.xdpattach` and
:mod:`~multihost.dataplane.xdpmaps`) must agree on -- bucket states, verdict counters,
hash-mode codes, the structs of every map key and value (as ``struct`` formats *and* as C),
map names and sizes -- and rendering them as the C header
``bpf/multihost_layout.h`` that the program includes.  Like Katran's and Cilium's shared map
definitions, nothing is declared twice: the header is generated from this module (a unit
test fails when the committed header is stale) and :data:`LAYOUT_DIGEST`, a hash of the
header, is compiled into the object so a loader refuses an object built from another layout.

Must not: touch the kernel, files or clocks; it is pure data and rendering.

Maps (all sized here; ``buckets`` sized by the loader before load):

=================  ===========  =========================================================
``mh_vip4``        array        IPv4 fast path: slot(daddr) -> (address, group + 1)
``mh_addrs``       hash         traffic IP (family + 16 address bytes) -> group index
``mh_groups``      array        group index -> active table copy, base offsets, seed, mode
``mh_buckets``     array        bucket states, 1 byte per bucket, 8 per element; mmapable
``mh_node``        array[1]     lease expiry (jiffies), the interface's MAC
``mh_stats``       percpu array group -> packets/bytes per verdict, last bucket seen
``mh_frags``       LRU hash     (family, proto, id, saddr, daddr) -> verdict of 1st fragment
``mh_udp_flows``   LRU hash     UDP (and other port protocols') flows passed in handover
``mh_ifaces``      hash         ifindex -> return group per family + its cluster MAC, the
                                interface's own MAC (replies to clients, IP transparency)
=================  ===========  =========================================================

Return groups (IP transparency, ``docs/transparency.md``) have an ``mh_groups`` entry of
their own (their hash mode, their counters) whose ``table`` is their front group's index:
the program reads the front group's active table, so both directions share one bucket
state and one flip.  A front group's ``table`` is its own index.  A frame that is not to a
traffic IP but to a cluster MAC (``mh_ifaces`` of the ingress interface) with a unicast
destination IP is a reply to a client: hashed by its return group and decided like a packet
to a traffic IP; passed, it gets the ingress interface's own MAC.

Bucket tables are double-buffered: group ``g`` owns ``2 * buckets`` consecutive bytes of
``mh_buckets`` starting at ``base``; ``active`` (0 or 1) says which half the program reads.
The loader rewrites the inactive half and then flips ``active`` with one map update, so a
packet sees the whole old table or the whole new one.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import IntEnum

from multihost.flowhash import HashMode

#: Pin-directory names are these map names; the programs' pins are ``prog`` and ``clock``.
MAP_NAMES = (
    "mh_vip4",
    "mh_addrs",
    "mh_groups",
    "mh_buckets",
    "mh_node",
    "mh_stats",
    "mh_frags",
    "mh_udp_flows",
    "mh_ifaces",
)
PROGRAM_NAME = "mh_xdp"
#: The clock program (never attached): ``BPF_PROG_RUN`` on a scratch frame returns
#: :data:`CLOCKS` (jiffies, CLOCK_MONOTONIC_COARSE ns) at the frame's start; pinned as
#: ``clock``, beside ``prog``.
CLOCK_PROGRAM_NAME = "mh_clock"

MAX_ADDRS = 4096
#: Slots of the IPv4 fast path (a power of two); see :func:`vip4_slot`.
VIP4_SLOTS = 1024
VIP4_SHIFT = 32 - 10
#: ``mh_vip4.group_plus_one`` of a slot two traffic IPs share: look in ``mh_addrs``.
VIP4_COLLIDE = 0xFFFFFFFF
MAX_GROUPS = 512
FRAG_ENTRIES = 8192
#: Interfaces carrying return groups (replies to clients).
MAX_IFACES = 64
UDP_FLOW_ENTRIES = 65536
#: Largest bucket space one group may use (issue: arrays up to 720,720 buckets).
MAX_BUCKETS = 1 << 20
#: Largest ``mh_buckets`` (every group's two halves): 512 groups of the 8-slot table
#: (40,320 buckets) fit, and 46 groups of the 16-slot one (720,720).
MAX_BUCKET_BYTES = 64 << 20


class BucketState(IntEnum):
    """One byte per bucket in ``mh_buckets`` (the nft backend's owned/draining/incoming)."""

    NONE = 0
    OWNED = 1
    DRAINING = 2
    INCOMING = 3


class Verdict(IntEnum):
    """Per-group counters in ``mh_stats`` (packets and bytes each)."""

    OWNED = 0  # owned bucket, lease held: passed
    DROPPED = 1  # bucket not served here
    HANDOVER_PASSED = 2  # draining/incoming (or owned with the lease lapsed): passed
    HANDOVER_DROPPED = 3  # draining/incoming: not this node's flow, dropped
    LEASE_LAPSED = 4  # a new flow in an owned bucket while the lease is lapsed: dropped
    TO_ALL = 5  # ICMP errors / neighbour discovery to a traffic IP: passed on every node
    FRAG_PASSED = 6  # a non-first fragment of a datagram this node takes
    FRAG_DROPPED = 7  # a non-first fragment of another node's datagram (or unknown)


#: Verdicts that count as ``accepted`` / ``dropped`` in the backend-neutral counters.
ACCEPTED = (Verdict.OWNED, Verdict.HANDOVER_PASSED, Verdict.TO_ALL, Verdict.FRAG_PASSED)
DROPPED = (
    Verdict.DROPPED,
    Verdict.HANDOVER_DROPPED,
    Verdict.LEASE_LAPSED,
    Verdict.FRAG_DROPPED,
)

HASH_MODES = {
    HashMode.FOUR_TUPLE: 0,
    HashMode.THREE_TUPLE: 1,
    HashMode.SOURCE_IP: 2,
    HashMode.SOURCE_IP_PORT: 3,
    HashMode.DESTINATION_IP: 4,
    HashMode.DESTINATION_IP_PORT: 5,
}

#: ``mh_node.lease_jiffies`` meaning "held, no expiry" (the program compares with jiffies).
LEASE_FOREVER = (1 << 64) - 1

# ------------------------------------------------------------------ struct layouts
# Each entry: (C type, field name, array length or 0, struct format char(s)).
_Field = tuple[str, str, int, str]


@dataclass(frozen=True)
class Struct:
    """A C struct shared by the program and the loader (native byte order, no padding
    beyond what the explicit ``pad`` fields say: every layout here is naturally aligned)."""

    name: str
    fields: tuple[_Field, ...]

    @property
    def fmt(self) -> str:
        return "=" + "".join(f"{n}{c}" if n else c for _, _, n, c in self.fields)

    @property
    def size(self) -> int:
        return struct.calcsize(self.fmt)

    def c(self) -> str:
        lines = [f"struct {self.name} {{"]
        for ctype, fname, n, _ in self.fields:
            lines.append(f"\t{ctype} {fname}{f'[{n}]' if n else ''};")
        lines.append("};")
        lines.append(f"_Static_assert(sizeof(struct {self.name}) == {self.size}, ")
        lines[-1] += f'"{self.name} layout");'
        return "\n".join(lines)


ADDR_KEY = Struct(
    "mh_addr_key",
    (("__u32", "family", 0, "I"), ("__u8", "addr", 16, "s")),
)
ADDR_VAL = Struct("mh_addr_val", (("__u32", "group", 0, "I"),))
VIP4 = Struct(
    "mh_vip4",
    (
        ("__u32", "addr", 0, "I"),  # the address as the program loads it (network order)
        ("__u32", "group_plus_one", 0, "I"),  # 0: free slot; VIP4_COLLIDE: see mh_addrs
    ),
)
GROUP = Struct(
    "mh_group",
    (
        ("__u32", "active", 0, "I"),  # 0 or 1: which half of the group's table is live
        ("__u32", "buckets", 0, "I"),  # modulus of the hash (nft: jhash ... mod B)
        ("__u32", "seed", 0, "I"),
        ("__u32", "mode", 0, "I"),  # HASH_MODES
        ("__u32", "base", 2, "I"),  # byte offsets of the two halves in mh_buckets
        ("__u32", "table", 0, "I"),  # group whose active/base are read (return: its front)
    ),
)
IFACE = Struct(
    "mh_iface",
    (
        ("__u32", "group4_plus_one", 0, "I"),  # return group of IPv4 replies + 1 (0: none)
        ("__u32", "group6_plus_one", 0, "I"),
        ("__u8", "mac4", 6, "s"),  # the cluster MAC replies of that family are sent to
        ("__u8", "mac6", 6, "s"),
        ("__u8", "own_mac", 6, "s"),  # the interface's MAC: a passed reply becomes HOST
        ("__u8", "pad", 2, "s"),
    ),
)
NODE = Struct(
    "mh_node",
    (
        ("__u64", "lease_jiffies", 0, "Q"),  # held while jiffies < this; 0 = lapsed
        ("__u8", "mac", 6, "s"),  # the interface's own MAC: owned packets become HOST
        ("__u8", "pad", 2, "s"),
        ("__u8", "layout", 32, "s"),  # LAYOUT_DIGEST of the loader that filled the maps
    ),
)
STATS = Struct(
    "mh_stats",
    (
        ("__u64", "packets", len(Verdict), "Q"),
        ("__u64", "bytes", len(Verdict), "Q"),
        ("__u32", "last_bucket", 0, "I"),  # last hashed packet's bucket (tests, debugging)
        ("__u32", "last_state", 0, "I"),
    ),
)
FRAG_KEY = Struct(
    "mh_frag_key",
    (
        ("__u8", "family", 0, "B"),
        ("__u8", "proto", 0, "B"),
        ("__u16", "pad", 0, "H"),
        ("__u32", "id", 0, "I"),
        ("__u8", "saddr", 16, "s"),
        ("__u8", "daddr", 16, "s"),
    ),
)
FRAG_VAL = Struct(
    "mh_frag_val",
    (("__u32", "pass", 0, "I"), ("__u32", "group", 0, "I")),
)
FLOW_KEY = Struct(
    "mh_flow_key",
    (
        ("__u8", "saddr", 16, "s"),
        ("__u8", "daddr", 16, "s"),
        ("__u16", "sport", 0, "H"),  # network byte order, as on the wire
        ("__u16", "dport", 0, "H"),
        ("__u8", "family", 0, "B"),
        ("__u8", "proto", 0, "B"),
        ("__u16", "pad", 0, "H"),
    ),
)
FLOW_VAL = Struct("mh_flow_val", (("__u64", "last_seen_ns", 0, "Q"),))
CLOCKS = Struct(
    "mh_clocks",
    (("__u64", "jiffies", 0, "Q"), ("__u64", "coarse_ns", 0, "Q")),  # read by mh_clock
)

STRUCTS = (
    ADDR_KEY,
    ADDR_VAL,
    VIP4,
    GROUP,
    IFACE,
    NODE,
    STATS,
    FRAG_KEY,
    FRAG_VAL,
    FLOW_KEY,
    FLOW_VAL,
    CLOCKS,
)

#: Bytes of bucket state per ``mh_buckets`` element (an array value is 8-byte aligned).
BUCKETS_PER_ELEMENT = 8


def limits_problem(groups: int, buckets: int, addresses: int) -> tuple[str, str] | None:
    """(config key, reason) if a configuration exceeds what the program's maps hold."""
    if groups > MAX_GROUPS:
        return "traffic_ip_group", f"{groups} groups: the XDP program takes at most {MAX_GROUPS}"
    if buckets > MAX_BUCKETS:
        return "buckets", f"{buckets} buckets: the XDP program takes at most {MAX_BUCKETS}"
    size = bucket_elements([buckets] * groups) * BUCKETS_PER_ELEMENT
    if size > MAX_BUCKET_BYTES:
        fit = MAX_BUCKET_BYTES // (2 * _round8(buckets))
        return (
            "traffic_ip_group",
            f"{groups} groups of {buckets:,} buckets need {size:,} bytes of bucket tables"
            f" (two per group); the XDP program takes at most {MAX_BUCKET_BYTES:,}, so at"
            f" most {fit} groups with this table",
        )
    if addresses > MAX_ADDRS:
        return (
            "traffic_ip_group",
            f"{addresses} traffic IPs: the XDP program takes at most {MAX_ADDRS}",
        )
    return None


#: Knuth's multiplicative hash constant (2^32 / golden ratio).
VIP4_MULT = 0x9E3779B1


def vip4_slot(addr: bytes) -> int:
    """The ``mh_vip4`` slot of an IPv4 address: the program multiplies the 4 address bytes,
    loaded as a little-endian word, by :data:`VIP4_MULT` and keeps the top bits."""
    word = int.from_bytes(addr, "little")
    return ((word * VIP4_MULT) & 0xFFFFFFFF) >> VIP4_SHIFT


def bucket_elements(group_buckets: list[int]) -> int:
    """``mh_buckets`` entries for groups of these sizes (two halves each, 8 per entry)."""
    total = sum(2 * _round8(b) for b in group_buckets)
    return max(1, total // BUCKETS_PER_ELEMENT)


def _round8(n: int) -> int:
    return (n + BUCKETS_PER_ELEMENT - 1) // BUCKETS_PER_ELEMENT * BUCKETS_PER_ELEMENT


def group_bases(group_buckets: list[int]) -> list[tuple[int, int]]:
    """Byte offsets (half 0, half 1) of each group's table in ``mh_buckets``."""
    out: list[tuple[int, int]] = []
    at = 0
    for b in group_buckets:
        r = _round8(b)
        out.append((at, at + r))
        at += 2 * r
    return out


def _defines() -> list[str]:
    lines = [
        f"#define MH_MAX_ADDRS {MAX_ADDRS}",
        f"#define MH_VIP4_SLOTS {VIP4_SLOTS}",
        f"#define MH_VIP4_SHIFT {VIP4_SHIFT}",
        f"#define MH_VIP4_COLLIDE {VIP4_COLLIDE:#x}",
        f"#define MH_VIP4_MULT {VIP4_MULT:#x}",
        f"#define MH_MAX_GROUPS {MAX_GROUPS}",
        f"#define MH_FRAG_ENTRIES {FRAG_ENTRIES}",
        f"#define MH_MAX_IFACES {MAX_IFACES}",
        f"#define MH_UDP_FLOW_ENTRIES {UDP_FLOW_ENTRIES}",
        f"#define MH_MAX_BUCKETS {MAX_BUCKETS}",
        f"#define MH_BUCKETS_PER_ELEMENT {BUCKETS_PER_ELEMENT}",
        f"#define MH_N_VERDICTS {len(Verdict)}",
        "#define MH_LEASE_FOREVER 0xffffffffffffffffULL",
    ]
    lines += [f"#define MH_STATE_{s.name} {s.value}" for s in BucketState]
    lines += [f"#define MH_V_{v.name} {v.value}" for v in Verdict]
    lines += [
        f"#define MH_HASH_{m.name} {code}"
        for m, code in sorted(HASH_MODES.items(), key=lambda kv: kv[1])
    ]
    return lines


def render_header() -> str:
    """The C header the program includes (committed as ``bpf/multihost_layout.h``)."""
    out = [
        "/* Generated by multihost.dataplane.xdplayout -- do not edit.",
        " * Regenerate: python -m multihost.dataplane.xdplayout > "
        "src/multihost/dataplane/bpf/multihost_layout.h */",
        "#ifndef MULTIHOST_LAYOUT_H",
        "#define MULTIHOST_LAYOUT_H",
        "",
        *_defines(),
        "",
    ]
    for s in STRUCTS:
        out += [s.c(), ""]
    out.append("#endif")
    return "\n".join(out) + "\n"


#: sha256 of the header: compiled into the object (``-DMH_LAYOUT_DIGEST``) and checked at load.
LAYOUT_DIGEST = hashlib.sha256(render_header().encode()).hexdigest()


if __name__ == "__main__":
    print(render_header(), end="")
