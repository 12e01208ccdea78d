"""Which buckets still carry this node's flows: a conntrack dump mapped through the model.

Owns: reading the kernel's conntrack table (pyroute2 ctnetlink dump), keeping the flows
whose original destination is a traffic IP, and mapping each to its bucket with the
bit-exact flow-hash model, so a draining bucket can be released as soon as its last flow
ends.  TCP entries in TIME_WAIT/CLOSE are finished connections and do not count; UDP and
other protocols count while their entry lives (see docs/handover.md).

Must not: change conntrack or nft; it is a read-only probe.  It blocks (netlink I/O):
the agent calls it from a worker thread.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from multihost.flowhash import Flow, FlowError, HashMode, flow_bucket

#: TCP conntrack states of a connection that is over (nf_conntrack_tcp.h).
TCP_FINISHED = frozenset({7, 8})  # TIME_WAIT, CLOSE
_PROTO_NAMES = {
    socket.IPPROTO_TCP: "tcp",
    socket.IPPROTO_UDP: "udp",
    132: "sctp",
    33: "dccp",
    136: "udplite",
    socket.IPPROTO_ICMP: "icmp",
    socket.IPPROTO_ICMPV6: "icmpv6",
}


@dataclass(frozen=True)
class GroupFlows:
    """Hash parameters of one group, enough to map a flow to its bucket."""

    addresses: frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]
    mode: HashMode


def buckets_in_use(
    entries: Iterable[tuple[str, int, str, int, int, int | None]],
    groups: Mapping[str, GroupFlows],
    buckets: int,
    seed: int,
) -> dict[str, Counter[int]]:
    """Pure part: ``(saddr, sport, daddr, dport, proto, tcp_state)`` -> flows per bucket."""
    by_addr = {a: name for name, g in groups.items() for a in g.addresses}
    out: dict[str, Counter[int]] = {name: Counter() for name in groups}
    for saddr, sport, daddr, dport, proto, tcp_state in entries:
        try:
            dst = ipaddress.ip_address(daddr)
        except ValueError:
            continue
        name = by_addr.get(dst)
        if name is None:
            continue
        if proto == socket.IPPROTO_TCP and tcp_state in TCP_FINISHED:
            continue
        try:
            flow = Flow(
                ipaddress.ip_address(saddr),
                sport or 0,
                dst,
                dport or 0,
                _PROTO_NAMES.get(proto, "other"),
            )
        except (FlowError, ValueError):
            continue
        out[name][flow_bucket(flow, buckets, seed, groups[name].mode)] += 1
    return out


def dump_entries() -> list[tuple[str, int, str, int, int, int | None]]:
    """The conntrack table of the current network namespace (blocking)."""
    from pyroute2 import Conntrack

    rows: list[tuple[str, int, str, int, int, int | None]] = []
    with Conntrack() as ct:
        for e in ct.dump_entries():
            t = e.tuple_orig
            state = e.protoinfo.state if e.protoinfo is not None else None
            rows.append(
                (
                    str(t.saddr),
                    int(t.sport or 0),
                    str(t.daddr),
                    int(t.dport or 0),
                    int(t.proto or 0),
                    state,
                )
            )
    return rows
