"""Ethernet frames for ``BPF_PROG_RUN`` tests of the XDP program, and the verdict model.

Owns: building IPv4/IPv6 TCP/UDP/ICMP frames (and IPv4/IPv6 fragments) from a
:class:`multihost.flowhash.Flow`, and the expected verdict of the XDP program for a bucket
state -- the same rules as ``bpf/multihost_xdp.c`` and docs/handover.md, written from the
documentation, not from the C.

Must not: touch the kernel; tests feed these frames to the loaded program.
"""

from __future__ import annotations

import ipaddress
import struct

from multihost.dataplane.xdplayout import BucketState, Verdict
from multihost.flowhash import Flow

VIP_MAC = bytes.fromhex("01005e400001")
CLIENT_MAC = bytes.fromhex("02aabbccdd01")
XDP_DROP, XDP_PASS = 1, 2
PROTO = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "sctp": 132, "other": 47}
SYN, ACK = 0x02, 0x10


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return int(~s & 0xFFFF)


def l4(flow: Flow, *, flags: int = SYN, payload: bytes = b"x" * 18, icmp_type: int = 8) -> bytes:
    """Transport header + payload (checksums zero: XDP does not check them)."""
    if flow.proto == "tcp":
        return struct.pack("!HHIIBBHHH", flow.sport, flow.dport, 1, 0, 5 << 4, flags, 65535, 0, 0)
    if flow.proto in ("udp", "sctp"):
        return struct.pack("!HHHH", flow.sport, flow.dport, 8 + len(payload), 0) + payload
    if flow.proto in ("icmp", "icmpv6"):
        return struct.pack("!BBHHH", icmp_type, 0, 0, 1, 1) + payload
    return payload


def frame(
    flow: Flow,
    *,
    flags: int = SYN,
    icmp_type: int = 8,
    payload: bytes = b"x" * 18,
    frag: tuple[int, bool, int] | None = None,
    body: bytes | None = None,
) -> bytes:
    """An Ethernet frame to the VIP MAC carrying ``flow``.  ``frag``: (byte offset, more
    fragments, identification); ``body``: the IP payload as is (for later fragments)."""
    data = body if body is not None else l4(flow, flags=flags, payload=payload, icmp_type=icmp_type)
    proto = PROTO[flow.proto]
    if flow.saddr.version == 4:
        ident, frag_field = 0x1234, 0
        if frag is not None:
            offset, more, ident = frag
            frag_field = (offset // 8) | (0x2000 if more else 0)
        hdr = struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(data),
            ident & 0xFFFF,
            frag_field,
            64,
            proto,
            0,
            flow.saddr.packed,
            flow.daddr.packed,
        )
        hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
        return VIP_MAC + CLIENT_MAC + b"\x08\x00" + hdr + data
    nxt = proto
    ext = b""
    if frag is not None:
        offset, more, ident = frag
        ext = struct.pack("!BBHI", proto, 0, (offset // 8) << 3 | int(more), ident)
        nxt = 44
    payload_len = len(ext) + len(data)
    hdr = struct.pack(
        "!IHBB16s16s", 6 << 28, payload_len, nxt, 64, flow.saddr.packed, flow.daddr.packed
    )
    return VIP_MAC + CLIENT_MAC + b"\x86\xdd" + hdr + ext + data


def expected(
    flow: Flow,
    state: BucketState,
    *,
    lease: bool = True,
    flags: int = SYN,
    local: bool = False,
    remembered: bool = False,
) -> Verdict:
    """What the XDP program must decide for a packet of ``flow`` in a bucket of ``state``.

    ``local``: this node has a TCP connection for the flow; ``remembered``: a non-TCP flow
    this node passed in a draining bucket."""
    tcp = flow.proto == "tcp"
    syn = flags & (0x01 | 0x02 | 0x04 | 0x10) == SYN
    if state is BucketState.OWNED:
        if lease:
            return Verdict.OWNED
        return Verdict.HANDOVER_PASSED if tcp and not syn and local else Verdict.LEASE_LAPSED
    if state is BucketState.DRAINING:
        if not tcp:
            return Verdict.HANDOVER_PASSED
        return Verdict.HANDOVER_PASSED if not syn and local else Verdict.HANDOVER_DROPPED
    if state is BucketState.INCOMING:
        if tcp and syn:
            return Verdict.HANDOVER_PASSED if lease else Verdict.LEASE_LAPSED
        if tcp:
            return Verdict.HANDOVER_PASSED if local else Verdict.HANDOVER_DROPPED
        return Verdict.HANDOVER_PASSED if remembered else Verdict.HANDOVER_DROPPED
    return Verdict.DROPPED


def passes(v: Verdict) -> bool:
    return v in (Verdict.OWNED, Verdict.HANDOVER_PASSED, Verdict.TO_ALL, Verdict.FRAG_PASSED)


def addr(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)
