"""Ethernet ARP and IPv6 Neighbor Discovery frames for the multicast-MAC responder.  Pure.

Owns: parsing received Ethernet+ARP frames and Ethernet+IPv6+ICMPv6 Neighbor Solicitations
(RFC 826, RFC 4861 §4.3/§7.1.1, including the ICMPv6 checksum of RFC 8200 §8.1), building the
answers a cluster member sends (ARP replies, gratuitous ARP, Neighbor Advertisements), and the
answer-or-ignore decision for a well-formed request.  Every answer carries the cluster's
*multicast* MAC as the resolved link-layer address and the node's own *unicast* MAC as the
Ethernet source (bridges drop frames whose source MAC is multicast).

Must not: open sockets, look at interfaces, log, or raise on received bytes: a parser returns
``Malformed(reason)`` for anything it cannot use.  Builders raise ``ValueError`` only for bad
arguments given by our own code (a MAC that is not 6 bytes).
"""

from __future__ import annotations

import struct
from collections.abc import Container
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address, IPv6Address
from typing import NamedTuple

ETH_HLEN = 14
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
_VLAN_ETHERTYPES = (0x8100, 0x88A8)

ARP_REQUEST = 1
ARP_REPLY = 2
ARP_LEN = 28  # Ethernet/IPv4 ARP body: 8-byte header + 2 * (6 + 4)
_HTYPE_ETHERNET = 1
_PTYPE_IPV4 = 0x0800

IPV6_HLEN = 40
IPPROTO_ICMPV6 = 58
ND_NEIGHBOR_SOLICIT = 135
ND_NEIGHBOR_ADVERT = 136
ND_HOP_LIMIT = 255
ND_OPT_SOURCE_LLADDR = 1
ND_OPT_TARGET_LLADDR = 2
NA_FLAG_ROUTER = 0x8000_0000
NA_FLAG_SOLICITED = 0x4000_0000
NA_FLAG_OVERRIDE = 0x2000_0000
_ND_MIN_LEN = 24  # ICMPv6 type, code, checksum, 4 bytes flags/reserved, 16 bytes target

BROADCAST_MAC = b"\xff" * 6
ZERO_MAC = b"\x00" * 6
ALL_NODES = IPv6Address("ff02::1")
ALL_NODES_MAC = b"\x33\x33\x00\x00\x00\x01"
_SOLICITED_NODE_PREFIX = IPv6Address("ff02::1:ff00:0").packed[:13]
_UNSPECIFIED6 = IPv6Address("::")

_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_ARP_HEAD = struct.Struct("!HHBBH")
_ETH_ARP = struct.Struct("!6s6sH" + _ARP.format[1:])
_GOOD_HEADS = ([1, 0x0800, 6, 4, 1], [1, 0x0800, 6, 4, 2])
_IP6 = struct.Struct("!IHBB16s16s")
_ND = struct.Struct("!BBHI16s")


class Reason(StrEnum):
    """Why a received frame is unusable (a counter label, so keep them short and stable)."""

    TRUNCATED = "truncated"
    VLAN_TAGGED = "vlan-tagged"
    UNKNOWN_ETHERTYPE = "unknown-ethertype"
    NOT_ARP = "not-arp"
    BAD_HTYPE = "bad-htype"
    BAD_PTYPE = "bad-ptype"
    BAD_HLEN = "bad-hlen"
    BAD_PLEN = "bad-plen"
    BAD_OP = "bad-op"
    NOT_IPV6 = "not-ipv6"
    BAD_VERSION = "bad-version"
    BAD_LENGTH = "bad-length"
    NOT_ICMPV6 = "not-icmpv6"
    NOT_ND = "not-nd"
    BAD_HOP_LIMIT = "bad-hop-limit"
    BAD_CODE = "bad-code"
    BAD_CHECKSUM = "bad-checksum"
    BAD_OPTION = "bad-option"
    MULTICAST_TARGET = "multicast-target"
    BAD_DAD = "bad-dad"
    BAD_FLAGS = "bad-flags"


class Ignore(StrEnum):
    """Why a well-formed request gets no answer from us."""

    NOT_REQUEST = "not-request"
    NOT_HOSTED = "not-hosted"
    GRATUITOUS = "gratuitous"  # sender IP == target IP: someone's announcement, not a question
    BAD_SENDER = "bad-sender"  # multicast/zero sender MAC: no sane place to send an answer
    CLUSTER_MAC = "cluster-mac"  # sent with our own multicast MAC: another member, or a loop


@dataclass(frozen=True, slots=True)
class Malformed:
    reason: Reason


class ArpPacket(NamedTuple):
    """One Ethernet/IPv4 ARP frame.  ``sha``/``tha``/``eth_*`` are 6-byte MACs.

    (Packets are NamedTuples rather than frozen dataclasses: 4x cheaper to create, which is
    most of the per-frame cost under a request flood.)
    """

    op: int
    sha: bytes
    spa: IPv4Address
    tha: bytes
    tpa: IPv4Address
    eth_src: bytes
    eth_dst: bytes


class NeighborSolicitation(NamedTuple):
    """A validated NS (RFC 4861 §7.1.1).  ``source_lladdr`` is the SLLA option, if any."""

    eth_dst: bytes
    eth_src: bytes
    src: IPv6Address
    dst: IPv6Address
    target: IPv6Address
    source_lladdr: bytes | None


class NeighborAdvertisement(NamedTuple):
    """A validated NA (RFC 4861 §7.1.2).  ``target_lladdr`` is the TLLA option, if any."""

    eth_dst: bytes
    eth_src: bytes
    src: IPv6Address
    dst: IPv6Address
    target: IPv6Address
    flags: int  # NA_FLAG_* bits
    target_lladdr: bytes | None


# ---------------------------------------------------------------------------------------- ARP


def parse_arp(frame: bytes) -> ArpPacket | Malformed:
    """Parse an Ethernet II frame carrying Ethernet/IPv4 ARP; trailing padding is allowed."""
    n = len(frame)
    if n >= ETH_HLEN + ARP_LEN:  # fast path: one unpack for a well-formed frame
        eth_dst, eth_src, ethertype, *head, sha, spa, tha, tpa = _ETH_ARP.unpack_from(frame)
        if ethertype == ETH_P_ARP and head in _GOOD_HEADS:
            return ArpPacket(
                head[4], sha, IPv4Address(spa), tha, IPv4Address(tpa), eth_src, eth_dst
            )
    if n < ETH_HLEN:
        return Malformed(Reason.TRUNCATED)
    eth_dst, eth_src, ethertype = _ETH.unpack_from(frame)
    if ethertype in _VLAN_ETHERTYPES:
        return Malformed(Reason.VLAN_TAGGED)
    if ethertype != ETH_P_ARP:
        return Malformed(Reason.NOT_ARP)
    if n < ETH_HLEN + _ARP_HEAD.size:
        return Malformed(Reason.TRUNCATED)
    htype, ptype, hlen, plen, op = _ARP_HEAD.unpack_from(frame, ETH_HLEN)
    if htype != _HTYPE_ETHERNET:
        return Malformed(Reason.BAD_HTYPE)
    if ptype != _PTYPE_IPV4:
        return Malformed(Reason.BAD_PTYPE)
    if hlen != 6:  # Ethernet MAC length
        return Malformed(Reason.BAD_HLEN)
    if plen != 4:  # IPv4 address length
        return Malformed(Reason.BAD_PLEN)
    if n < ETH_HLEN + ARP_LEN:
        return Malformed(Reason.TRUNCATED)
    if op not in (ARP_REQUEST, ARP_REPLY):
        return Malformed(Reason.BAD_OP)
    _, _, _, _, _, sha, spa, tha, tpa = _ARP.unpack_from(frame, ETH_HLEN)
    return ArpPacket(op, sha, IPv4Address(spa), tha, IPv4Address(tpa), eth_src, eth_dst)


def encode_arp(pkt: ArpPacket) -> bytes:
    """The 42-byte frame for ``pkt`` (no padding: the driver pads to 60 like for kernel ARP)."""
    for mac in (pkt.sha, pkt.tha, pkt.eth_src, pkt.eth_dst):
        _check_mac(mac)
    return _ETH.pack(pkt.eth_dst, pkt.eth_src, ETH_P_ARP) + _ARP.pack(
        _HTYPE_ETHERNET,
        _PTYPE_IPV4,
        6,
        4,
        pkt.op,
        pkt.sha,
        pkt.spa.packed,
        pkt.tha,
        pkt.tpa.packed,
    )


def build_arp_reply(request: ArpPacket, vip_mac: bytes, own_mac: bytes) -> bytes:
    """Answer ``request``: "``request.tpa`` is at ``vip_mac``", unicast to the requester.

    Like the Linux kernel, the requester is ``request.sha`` (Ethernet destination and target
    hardware address); an RFC 5227 probe (sender IP 0.0.0.0) is answered the same way.
    """
    _check_mac(vip_mac)
    _check_mac(own_mac)
    return _ETH.pack(request.sha, own_mac, ETH_P_ARP) + _ARP.pack(
        _HTYPE_ETHERNET,
        _PTYPE_IPV4,
        6,
        4,
        ARP_REPLY,
        vip_mac,
        request.tpa.packed,
        request.sha,
        request.spa.packed,
    )


def build_gratuitous_arp(
    vip: IPv4Address, vip_mac: bytes, own_mac: bytes, op: int = ARP_REQUEST
) -> bytes:
    """A broadcast announcement ``vip is at vip_mac`` (sender IP == target IP == ``vip``).

    As a request the target MAC is zero (RFC 5227 §3); as a reply it repeats ``vip_mac``
    (RFC 5944 §4.6).  Some neighbours only listen to one kind, so callers send both.
    """
    if op not in (ARP_REQUEST, ARP_REPLY):
        raise ValueError(f"ARP op must be {ARP_REQUEST} or {ARP_REPLY}, got {op}")
    tha = ZERO_MAC if op == ARP_REQUEST else vip_mac
    return encode_arp(ArpPacket(op, vip_mac, vip, tha, vip, own_mac, BROADCAST_MAC))


def arp_ignore_reason(
    pkt: ArpPacket, hosted: Container[IPv4Address], vip_mac: bytes
) -> Ignore | None:
    """``None`` if ``pkt`` is a request we must answer, else why not."""
    if pkt.op != ARP_REQUEST:
        return Ignore.NOT_REQUEST
    if pkt.tpa not in hosted:
        return Ignore.NOT_HOSTED
    if pkt.sha == vip_mac:
        return Ignore.CLUSTER_MAC
    if pkt.spa == pkt.tpa:
        return Ignore.GRATUITOUS
    if _bad_unicast(pkt.sha) or _bad_unicast(pkt.eth_src):
        return Ignore.BAD_SENDER
    return None


# ------------------------------------------------------------------------------ IPv6 / NDP


def icmpv6_checksum(src: IPv6Address, dst: IPv6Address, message: bytes) -> int:
    """RFC 8200 §8.1 checksum of an ICMPv6 ``message`` (0 when verifying a correct one)."""
    pseudo = src.packed + dst.packed + struct.pack("!I3xB", len(message), IPPROTO_ICMPV6)
    data = pseudo + message
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def solicited_node(addr: IPv6Address) -> IPv6Address:
    """The solicited-node multicast group ``ff02::1:ffXX:XXXX`` of ``addr`` (RFC 4291 §2.7.1)."""
    return IPv6Address(_SOLICITED_NODE_PREFIX + addr.packed[13:])


def solicited_node_mac(addr: IPv6Address) -> bytes:
    """The Ethernet multicast MAC ``33:33:ff:XX:XX:XX`` that solicitations for ``addr`` use."""
    return b"\x33\x33\xff" + addr.packed[13:]


def ipv6_multicast_mac(group: IPv6Address) -> bytes:
    """RFC 2464 §7: ``33:33`` + the low 32 bits of the group."""
    return b"\x33\x33" + group.packed[12:]


def parse_neighbor_solicitation(frame: bytes) -> NeighborSolicitation | Malformed:
    """Parse and validate (RFC 4861 §7.1.1) an Ethernet/IPv6 Neighbor Solicitation."""
    nd = _parse_nd(frame, ND_NEIGHBOR_SOLICIT)
    if isinstance(nd, Malformed):
        return nd
    eth_dst, eth_src, src, dst, _flags, target, lladdr = nd
    if src == _UNSPECIFIED6 and (lladdr is not None or dst.packed[:13] != _SOLICITED_NODE_PREFIX):
        return Malformed(Reason.BAD_DAD)
    return NeighborSolicitation(eth_dst, eth_src, src, dst, target, lladdr)


def parse_neighbor_advertisement(frame: bytes) -> NeighborAdvertisement | Malformed:
    """Parse and validate (RFC 4861 §7.1.2) an Ethernet/IPv6 Neighbor Advertisement."""
    nd = _parse_nd(frame, ND_NEIGHBOR_ADVERT)
    if isinstance(nd, Malformed):
        return nd
    eth_dst, eth_src, src, dst, flags, target, lladdr = nd
    if dst.is_multicast and flags & NA_FLAG_SOLICITED:
        return Malformed(Reason.BAD_FLAGS)
    return NeighborAdvertisement(eth_dst, eth_src, src, dst, target, flags, lladdr)


def build_neighbor_solicitation(
    src: IPv6Address,
    target: IPv6Address,
    src_mac: bytes,
    *,
    dst: IPv6Address | None = None,
    eth_dst: bytes | None = None,
) -> bytes:
    """An NS for ``target`` (to its solicited-node group unless ``dst``); SLLA unless DAD."""
    dst = solicited_node(target) if dst is None else dst
    if eth_dst is None:
        eth_dst = ipv6_multicast_mac(dst) if dst.is_multicast else BROADCAST_MAC
    options = b"" if src == _UNSPECIFIED6 else _lladdr_option(ND_OPT_SOURCE_LLADDR, src_mac)
    return _build_nd(
        ND_NEIGHBOR_SOLICIT,
        0,
        eth_dst=eth_dst,
        eth_src=src_mac,
        src=src,
        dst=dst,
        target=target,
        options=options,
    )


def build_neighbor_advertisement(ns: NeighborSolicitation, vip_mac: bytes, own_mac: bytes) -> bytes:
    """Answer ``ns``: "``ns.target`` is at ``vip_mac``" (RFC 4861 §7.2.4).

    Solicited (S) and Override (O) set, Router (R) clear; unicast to the solicitor (at its SLLA
    if given, else its Ethernet source).  A DAD probe (source ``::``) is answered to all-nodes
    with S clear.  O is set although several members answer: they all give the same MAC.
    """
    flags = NA_FLAG_OVERRIDE
    if ns.src == _UNSPECIFIED6:
        dst, eth_dst = ALL_NODES, ALL_NODES_MAC
    else:
        dst, eth_dst = ns.src, ns.source_lladdr or ns.eth_src
        flags |= NA_FLAG_SOLICITED
    options = _lladdr_option(ND_OPT_TARGET_LLADDR, vip_mac)
    return _build_nd(
        ND_NEIGHBOR_ADVERT,
        flags,
        eth_dst=eth_dst,
        eth_src=own_mac,
        src=ns.target,
        dst=dst,
        target=ns.target,
        options=options,
    )


def build_unsolicited_na(vip: IPv6Address, vip_mac: bytes, own_mac: bytes) -> bytes:
    """An announcement "``vip`` is at ``vip_mac``" to all-nodes (RFC 4861 §7.2.6), O set."""
    options = _lladdr_option(ND_OPT_TARGET_LLADDR, vip_mac)
    return _build_nd(
        ND_NEIGHBOR_ADVERT,
        NA_FLAG_OVERRIDE,
        eth_dst=ALL_NODES_MAC,
        eth_src=own_mac,
        src=vip,
        dst=ALL_NODES,
        target=vip,
        options=options,
    )


def ns_ignore_reason(
    ns: NeighborSolicitation, hosted: Container[IPv6Address], vip_mac: bytes
) -> Ignore | None:
    """``None`` if ``ns`` is a solicitation we must answer, else why not."""
    if ns.target not in hosted:
        return Ignore.NOT_HOSTED
    if vip_mac in (ns.eth_src, ns.source_lladdr):
        return Ignore.CLUSTER_MAC
    if _bad_unicast(ns.eth_src):
        return Ignore.BAD_SENDER
    if ns.source_lladdr is not None and _bad_unicast(ns.source_lladdr):
        return Ignore.BAD_SENDER
    return None


def parse_frame(frame: bytes) -> ArpPacket | NeighborSolicitation | Malformed:
    """Dispatch on the Ethertype: ARP, or an IPv6 Neighbor Solicitation."""
    if len(frame) < ETH_HLEN:
        return Malformed(Reason.TRUNCATED)
    ethertype = (frame[12] << 8) | frame[13]
    if ethertype == ETH_P_ARP:
        return parse_arp(frame)
    if ethertype == ETH_P_IPV6:
        return parse_neighbor_solicitation(frame)
    if ethertype in _VLAN_ETHERTYPES:
        return Malformed(Reason.VLAN_TAGGED)
    return Malformed(Reason.UNKNOWN_ETHERTYPE)


# -------------------------------------------------------------------------------- internals

_NdFields = tuple[bytes, bytes, IPv6Address, IPv6Address, int, IPv6Address, bytes | None]


def _parse_nd(frame: bytes, icmp_type: int) -> _NdFields | Malformed:
    """Common IPv6 + ICMPv6 + option validation of NS/NA (RFC 4861 §7.1.1, §7.1.2)."""
    n = len(frame)
    if n < ETH_HLEN:
        return Malformed(Reason.TRUNCATED)
    eth_dst, eth_src, ethertype = _ETH.unpack_from(frame)
    if ethertype in _VLAN_ETHERTYPES:
        return Malformed(Reason.VLAN_TAGGED)
    if ethertype != ETH_P_IPV6:
        return Malformed(Reason.NOT_IPV6)
    if n < ETH_HLEN + IPV6_HLEN:
        return Malformed(Reason.TRUNCATED)
    vtf, payload_len, next_header, hop_limit, src_b, dst_b = _IP6.unpack_from(frame, ETH_HLEN)
    if vtf >> 28 != 6:  # IP version
        return Malformed(Reason.BAD_VERSION)
    if next_header != IPPROTO_ICMPV6:
        return Malformed(Reason.NOT_ICMPV6)  # (extension headers are not followed)
    start = ETH_HLEN + IPV6_HLEN
    if start + payload_len > n:
        return Malformed(Reason.TRUNCATED)
    if payload_len == 0:  # empty, or a jumbogram (which needs a hop-by-hop header anyway)
        return Malformed(Reason.BAD_LENGTH)
    message = frame[start : start + payload_len]
    if message[0] != icmp_type:
        return Malformed(Reason.NOT_ND)
    if payload_len < _ND_MIN_LEN:
        return Malformed(Reason.BAD_LENGTH)
    if hop_limit != ND_HOP_LIMIT:
        return Malformed(Reason.BAD_HOP_LIMIT)
    _type, code, _cksum, flags, target_b = _ND.unpack_from(message)
    if code != 0:
        return Malformed(Reason.BAD_CODE)
    src, dst = IPv6Address(src_b), IPv6Address(dst_b)
    if icmpv6_checksum(src, dst, message) != 0:
        return Malformed(Reason.BAD_CHECKSUM)
    if target_b[0] == 0xFF:  # multicast prefix ff00::/8
        return Malformed(Reason.MULTICAST_TARGET)
    want = ND_OPT_SOURCE_LLADDR if icmp_type == ND_NEIGHBOR_SOLICIT else ND_OPT_TARGET_LLADDR
    lladdr: bytes | None = None
    off = _ND_MIN_LEN
    while off < payload_len:
        if off + 2 > payload_len:
            return Malformed(Reason.BAD_OPTION)
        opt_type, opt_len = message[off], message[off + 1]
        end = off + 8 * opt_len
        if opt_len == 0 or end > payload_len:
            return Malformed(Reason.BAD_OPTION)
        if opt_type == want:
            if opt_len != 1:  # an Ethernet address option is exactly 8 bytes (RFC 2464 §6)
                return Malformed(Reason.BAD_OPTION)
            lladdr = message[off + 2 : off + 8]
        off = end
    return eth_dst, eth_src, src, dst, flags, IPv6Address(target_b), lladdr


def _build_nd(
    icmp_type: int,
    flags: int,
    *,
    eth_dst: bytes,
    eth_src: bytes,
    src: IPv6Address,
    dst: IPv6Address,
    target: IPv6Address,
    options: bytes,
) -> bytes:
    _check_mac(eth_dst)
    _check_mac(eth_src)
    message = bytearray(_ND.pack(icmp_type, 0, 0, flags, target.packed) + options)
    struct.pack_into("!H", message, 2, icmpv6_checksum(src, dst, bytes(message)))
    ip6 = _IP6.pack(6 << 28, len(message), IPPROTO_ICMPV6, ND_HOP_LIMIT, src.packed, dst.packed)
    return _ETH.pack(eth_dst, eth_src, ETH_P_IPV6) + ip6 + bytes(message)


def _lladdr_option(opt_type: int, mac: bytes) -> bytes:
    _check_mac(mac)
    return bytes((opt_type, 1)) + mac


def _check_mac(mac: bytes) -> None:
    if len(mac) != 6:  # Ethernet MAC length
        raise ValueError(f"a MAC address has 6 bytes, got {len(mac)}")


def _bad_unicast(mac: bytes) -> bool:
    """Multicast/broadcast (I/G bit set) or all-zero: not somewhere to send an answer."""
    return bool(mac[0] & 0x01) or mac == ZERO_MAC
