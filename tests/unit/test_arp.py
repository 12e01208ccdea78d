"""ARP / Neighbor Discovery frames (golden bytes, round trips, fuzzing) and the BPF filter.

Golden frames: ``KERNEL_*`` were captured from Linux 6.x in a test netns (client MAC set to
02:00:00:00:00:01); the expected answers are assembled field by field below, their ICMPv6
checksums computed by hand with 32-bit-word sums (and confirmed by ``tcpdump -vv``: "icmp6 sum
ok"); the netns tests show the Linux kernel accepting them.
"""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multihost.dataplane import arp
from multihost.dataplane.arp import ArpPacket, Ignore, Malformed, Reason
from multihost.dataplane.responder import BPF_MAXINSNS, FilterMode, attach_filter, build_filter
from multihost.macaddr import multicast_mac

CLIENT_MAC = bytes.fromhex("020000000001")
OWN_MAC = bytes.fromhex("020000000002")
VIP_MAC = multicast_mac("239.192.0.1")
VIP_MAC6 = multicast_mac("ff15::efc0:1")
VIP = IPv4Address("198.18.0.100")
CLIENT = IPv4Address("198.18.0.1")
VIP6 = IPv6Address("fd00:198:18::100")
CLIENT6 = IPv6Address("fd00:198:18::1")

# bytes.fromhex skips the spaces between fields.
# who-has 198.18.0.100 tell 198.18.0.1 (42 bytes: the driver pads on the wire).
KERNEL_ARP_REQUEST = bytes.fromhex(
    "ffffffffffff 020000000001 0806 0001 0800 06 04 0001"
    " 020000000001 c6120001 000000000000 c6120064"
)
# NS fd00:198:18::1 -> ff02::1:ff00:100, who-has fd00:198:18::100, SLLA 02:00:00:00:00:01.
KERNEL_NS = bytes.fromhex(
    "3333ff000100 020000000001 86dd 60000000 0020 3a ff"
    " fd000198001800000000000000000001 ff0200000000000000000001ff000100"
    " 87 00 783b 00000000 fd000198001800000000000000000100 01 01 020000000001"
)
# DAD probe :: -> ff02::1:ff7d:7a58 for a link-local address, with a nonce option (RFC 7527).
KERNEL_DAD = bytes.fromhex(
    "3333ff7d7a58 020000000001 86dd 60000000 0020 3a ff"
    " 00000000000000000000000000000000 ff0200000000000000000001ff7d7a58"
    " 87 00 c60f 00000000 fe80000000000000542c52fffe7d7a58 0e 01 97e28f45e60e"
)
EXPECTED_ARP_REPLY = bytes.fromhex(
    "020000000001 020000000002 0806 0001 0800 06 04 0002"
    " 01005e400001 c6120064 020000000001 c6120001"
)
EXPECTED_GARP_REQUEST = bytes.fromhex(
    "ffffffffffff 020000000002 0806 0001 0800 06 04 0001"
    " 01005e400001 c6120064 000000000000 c6120064"
)
EXPECTED_GARP_REPLY = bytes.fromhex(
    "ffffffffffff 020000000002 0806 0001 0800 06 04 0002"
    " 01005e400001 c6120064 01005e400001 c6120064"
)
EXPECTED_NA = bytes.fromhex(  # flags S|O, target link-layer address option
    "020000000001 020000000002 86dd 60000000 0020 3a ff"
    " fd000198001800000000000000000100 fd000198001800000000000000000001"
    " 88 00 f49a 60000000 fd000198001800000000000000000100 02 01 3333efc00001"
)
EXPECTED_UNSOLICITED_NA = bytes.fromhex(  # flags O, to all-nodes
    "333300000001 020000000002 86dd 60000000 0020 3a ff"
    " fd000198001800000000000000000100 ff020000000000000000000000000001"
    " 88 00 3449 20000000 fd000198001800000000000000000100 02 01 3333efc00001"
)
REQUEST = ArpPacket(arp.ARP_REQUEST, CLIENT_MAC, CLIENT, arp.ZERO_MAC, VIP, CLIENT_MAC,
                    arp.BROADCAST_MAC)  # fmt: skip


def request(**changes: Any) -> ArpPacket:
    return REQUEST._replace(**changes)


# --------------------------------------------------------------------------------- ARP golden


def test_parse_kernel_arp_request() -> None:
    assert arp.parse_arp(KERNEL_ARP_REQUEST) == request()


def test_padded_frame_parses_like_the_bare_one() -> None:
    padded = KERNEL_ARP_REQUEST + bytes(60 - len(KERNEL_ARP_REQUEST))
    assert arp.parse_arp(padded) == request()


def test_arp_reply_golden() -> None:
    reply = arp.build_arp_reply(request(), VIP_MAC, OWN_MAC)
    assert reply.hex() == EXPECTED_ARP_REPLY.hex()


def test_arp_probe_is_answered_to_its_sender_mac_with_zero_target_ip() -> None:
    probe = request(spa=IPv4Address("0.0.0.0"))
    assert arp.arp_ignore_reason(probe, {VIP}, VIP_MAC) is None
    reply = arp.parse_arp(arp.build_arp_reply(probe, VIP_MAC, OWN_MAC))
    assert isinstance(reply, ArpPacket)
    assert (reply.eth_dst, reply.tha, reply.tpa) == (CLIENT_MAC, CLIENT_MAC, IPv4Address(0))
    assert (reply.sha, reply.spa, reply.eth_src) == (VIP_MAC, VIP, OWN_MAC)


def test_gratuitous_arp_golden() -> None:
    assert arp.build_gratuitous_arp(VIP, VIP_MAC, OWN_MAC).hex() == EXPECTED_GARP_REQUEST.hex()
    garp_reply = arp.build_gratuitous_arp(VIP, VIP_MAC, OWN_MAC, arp.ARP_REPLY)
    assert garp_reply.hex() == EXPECTED_GARP_REPLY.hex()
    with pytest.raises(ValueError):
        arp.build_gratuitous_arp(VIP, VIP_MAC, OWN_MAC, op=3)


def test_builders_reject_bad_macs() -> None:
    with pytest.raises(ValueError):
        arp.build_arp_reply(request(), VIP_MAC[:5], OWN_MAC)
    with pytest.raises(ValueError):
        arp.build_unsolicited_na(VIP6, VIP_MAC6, OWN_MAC + b"\x00")


def _with(frame: bytes, offset: int, value: bytes) -> bytes:
    return frame[:offset] + value + frame[offset + len(value) :]


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"", Reason.TRUNCATED),
        (KERNEL_ARP_REQUEST[:13], Reason.TRUNCATED),
        (_with(KERNEL_ARP_REQUEST, 12, b"\x81\x00"), Reason.VLAN_TAGGED),
        (_with(KERNEL_ARP_REQUEST, 12, b"\x08\x00"), Reason.NOT_ARP),
        (KERNEL_ARP_REQUEST[:21], Reason.TRUNCATED),
        (_with(KERNEL_ARP_REQUEST, 14, b"\x00\x06"), Reason.BAD_HTYPE),
        (_with(KERNEL_ARP_REQUEST, 16, b"\x86\xdd"), Reason.BAD_PTYPE),
        (_with(KERNEL_ARP_REQUEST, 18, b"\x08"), Reason.BAD_HLEN),
        (_with(KERNEL_ARP_REQUEST, 19, b"\x10"), Reason.BAD_PLEN),
        (KERNEL_ARP_REQUEST[:41], Reason.TRUNCATED),
        (_with(KERNEL_ARP_REQUEST, 20, b"\x00\x03"), Reason.BAD_OP),  # RARP
        (_with(KERNEL_ARP_REQUEST, 20, b"\x00\x00"), Reason.BAD_OP),
    ],
)
def test_malformed_arp(frame: bytes, reason: Reason) -> None:
    assert arp.parse_arp(frame) == Malformed(reason)


@pytest.mark.parametrize(
    ("pkt", "why"),
    [
        (request(), None),
        (request(op=arp.ARP_REPLY), Ignore.NOT_REQUEST),
        (request(tpa=IPv4Address("198.18.0.7")), Ignore.NOT_HOSTED),
        (request(spa=VIP), Ignore.GRATUITOUS),  # another member's announcement
        (request(sha=VIP_MAC, spa=VIP), Ignore.CLUSTER_MAC),
        (request(sha=VIP_MAC), Ignore.CLUSTER_MAC),
        (request(sha=arp.BROADCAST_MAC), Ignore.BAD_SENDER),
        (request(sha=arp.ZERO_MAC), Ignore.BAD_SENDER),
        (request(eth_src=bytes.fromhex("030000000001")), Ignore.BAD_SENDER),
    ],
)
def test_arp_ignore_reason(pkt: ArpPacket, why: Ignore | None) -> None:
    assert arp.arp_ignore_reason(pkt, frozenset({VIP}), VIP_MAC) == why


macs = st.binary(min_size=6, max_size=6)
ipv4s = st.builds(IPv4Address, st.integers(0, 2**32 - 1))
ipv6s = st.builds(IPv6Address, st.integers(0, 2**128 - 1))


@given(st.builds(ArpPacket, st.sampled_from([1, 2]), macs, ipv4s, macs, ipv4s, macs, macs))
def test_arp_round_trip(pkt: ArpPacket) -> None:
    frame = arp.encode_arp(pkt)
    assert len(frame) == 42
    assert arp.parse_arp(frame) == pkt
    assert arp.parse_frame(frame) == pkt


@given(ipv4s, macs, macs)
def test_reply_answers_the_request(tpa: IPv4Address, sha: bytes, own: bytes) -> None:
    req = request(tpa=tpa, sha=sha)
    reply = arp.parse_arp(arp.build_arp_reply(req, VIP_MAC, own))
    assert reply == ArpPacket(arp.ARP_REPLY, VIP_MAC, tpa, sha, CLIENT, own, sha)


# --------------------------------------------------------------------------------- NDP golden


def test_parse_kernel_ns() -> None:
    ns = arp.parse_neighbor_solicitation(KERNEL_NS)
    group = IPv6Address("ff02::1:ff00:100")
    assert isinstance(ns, arp.NeighborSolicitation)
    assert ns == (bytes.fromhex("3333ff000100"), CLIENT_MAC, CLIENT6, group, VIP6, CLIENT_MAC)
    assert arp.parse_frame(KERNEL_NS) == ns
    assert nd_frame() == KERNEL_NS  # the helper below builds the kernel's frame


def test_parse_kernel_dad_probe_with_nonce_option() -> None:
    ns = arp.parse_neighbor_solicitation(KERNEL_DAD)
    assert isinstance(ns, arp.NeighborSolicitation)
    assert (ns.src, ns.target, ns.source_lladdr) == (
        IPv6Address("::"),
        IPv6Address("fe80::542c:52ff:fe7d:7a58"),
        None,
    )


def test_na_golden() -> None:
    ns = arp.parse_neighbor_solicitation(KERNEL_NS)
    assert isinstance(ns, arp.NeighborSolicitation)
    assert arp.ns_ignore_reason(ns, {VIP6}, VIP_MAC6) is None
    na = arp.build_neighbor_advertisement(ns, VIP_MAC6, OWN_MAC)
    assert na.hex() == EXPECTED_NA.hex()


def test_unsolicited_na_golden() -> None:
    assert arp.build_unsolicited_na(VIP6, VIP_MAC6, OWN_MAC).hex() == EXPECTED_UNSOLICITED_NA.hex()


def test_na_for_dad_probe_goes_to_all_nodes_unsolicited() -> None:
    dad = arp.parse_neighbor_solicitation(
        arp.build_neighbor_solicitation(IPv6Address("::"), VIP6, CLIENT_MAC)
    )
    assert isinstance(dad, arp.NeighborSolicitation)
    na = arp.parse_neighbor_advertisement(arp.build_neighbor_advertisement(dad, VIP_MAC6, OWN_MAC))
    assert isinstance(na, arp.NeighborAdvertisement)
    want = (arp.ALL_NODES, arp.ALL_NODES_MAC, arp.NA_FLAG_OVERRIDE)
    assert (na.dst, na.eth_dst, na.flags) == want


def test_na_without_slla_goes_to_the_ethernet_source() -> None:
    ns = arp.NeighborSolicitation(OWN_MAC, CLIENT_MAC, CLIENT6, VIP6, VIP6, None)
    na = arp.parse_neighbor_advertisement(arp.build_neighbor_advertisement(ns, VIP_MAC6, OWN_MAC))
    assert isinstance(na, arp.NeighborAdvertisement)
    assert (na.eth_dst, na.dst, na.target_lladdr) == (CLIENT_MAC, CLIENT6, VIP_MAC6)


def test_checksum_of_a_correct_message_is_zero() -> None:
    message = KERNEL_NS[54:]
    src, dst = IPv6Address(KERNEL_NS[22:38]), IPv6Address(KERNEL_NS[38:54])
    assert arp.icmpv6_checksum(src, dst, message) == 0
    assert arp.icmpv6_checksum(src, dst, _with(message, 2, b"\x00\x00")) == 0x783B


def _reference_checksum(src: IPv6Address, dst: IPv6Address, message: bytes) -> int:
    """Byte-pair sum written independently of arp.icmpv6_checksum."""
    data = src.packed + dst.packed + len(message).to_bytes(4) + b"\x00\x00\x00\x3a" + message
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) + (data[i + 1] if i + 1 < len(data) else 0)
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@given(ipv6s, ipv6s, st.binary(max_size=300))
def test_checksum_matches_reference(src: IPv6Address, dst: IPv6Address, message: bytes) -> None:
    assert arp.icmpv6_checksum(src, dst, message) == _reference_checksum(src, dst, message)


def test_solicited_node() -> None:
    assert arp.solicited_node(VIP6) == IPv6Address("ff02::1:ff00:100")
    assert arp.solicited_node_mac(VIP6) == bytes.fromhex("3333ff000100")
    assert arp.ipv6_multicast_mac(arp.ALL_NODES) == arp.ALL_NODES_MAC


unicast6 = ipv6s.filter(lambda a: not a.is_multicast and not a.is_unspecified)


@given(unicast6, unicast6, macs)
def test_ns_round_trip(src: IPv6Address, target: IPv6Address, mac: bytes) -> None:
    ns = arp.parse_neighbor_solicitation(arp.build_neighbor_solicitation(src, target, mac))
    group = arp.solicited_node(target)
    assert ns == (arp.ipv6_multicast_mac(group), mac, src, group, target, mac)
    assert isinstance(ns, arp.NeighborSolicitation)


@given(unicast6, unicast6, macs, macs)
def test_na_answers_the_ns(src: IPv6Address, target: IPv6Address, mac: bytes, own: bytes) -> None:
    ns = arp.parse_neighbor_solicitation(arp.build_neighbor_solicitation(src, target, mac))
    assert isinstance(ns, arp.NeighborSolicitation)
    na = arp.parse_neighbor_advertisement(arp.build_neighbor_advertisement(ns, VIP_MAC6, own))
    flags = arp.NA_FLAG_SOLICITED | arp.NA_FLAG_OVERRIDE
    assert na == (mac, own, target, src, target, flags, VIP_MAC6)
    assert isinstance(na, arp.NeighborAdvertisement)


def nd_frame(
    *,
    src: IPv6Address = CLIENT6,
    dst: IPv6Address | None = None,
    target: IPv6Address = VIP6,
    icmp_type: int = arp.ND_NEIGHBOR_SOLICIT,
    code: int = 0,
    hop_limit: int = 255,
    options: bytes = b"\x01\x01" + CLIENT_MAC,
    version: int = 6,
    next_header: int = 58,
    payload_len: int | None = None,
) -> bytes:
    """An ND frame with any field wrong (but a correct checksum)."""
    dst = arp.solicited_node(target) if dst is None else dst
    message = bytearray(struct.pack("!BBHI16s", icmp_type, code, 0, 0, target.packed) + options)
    struct.pack_into("!H", message, 2, arp.icmpv6_checksum(src, dst, bytes(message)))
    plen = len(message) if payload_len is None else payload_len
    ip6 = struct.pack("!IHBB", version << 28, plen, next_header, hop_limit)
    eth = arp.ipv6_multicast_mac(dst) + CLIENT_MAC + b"\x86\xdd"
    return eth + ip6 + src.packed + dst.packed + bytes(message)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (KERNEL_NS[:10], Reason.TRUNCATED),
        (_with(KERNEL_NS, 12, b"\x81\x00"), Reason.VLAN_TAGGED),
        (KERNEL_ARP_REQUEST, Reason.NOT_IPV6),
        (KERNEL_NS[:53], Reason.TRUNCATED),
        (nd_frame(version=4), Reason.BAD_VERSION),
        (nd_frame(next_header=0), Reason.NOT_ICMPV6),  # hop-by-hop header: not followed
        (KERNEL_NS[:-1], Reason.TRUNCATED),
        (nd_frame(payload_len=0), Reason.BAD_LENGTH),
        (nd_frame(icmp_type=128), Reason.NOT_ND),  # echo request
        (nd_frame(payload_len=20), Reason.BAD_LENGTH),
        (nd_frame(hop_limit=254), Reason.BAD_HOP_LIMIT),
        (nd_frame(code=1), Reason.BAD_CODE),
        (_with(KERNEL_NS, 56, b"\x78\x3c"), Reason.BAD_CHECKSUM),
        (_with(KERNEL_NS, 70, b"\x02"), Reason.BAD_CHECKSUM),  # one bit of the source
        (nd_frame(target=IPv6Address("ff02::1")), Reason.MULTICAST_TARGET),
        (nd_frame(options=b"\x01\x00" + CLIENT_MAC), Reason.BAD_OPTION),  # zero length
        (nd_frame(options=b"\x01\x02" + CLIENT_MAC), Reason.BAD_OPTION),  # overruns
        (nd_frame(options=b"\x01\x02" + CLIENT_MAC + bytes(8)), Reason.BAD_OPTION),  # not 8
        (nd_frame(options=b"\x01"), Reason.BAD_OPTION),  # half an option header
        (nd_frame(src=IPv6Address("::")), Reason.BAD_DAD),  # DAD with an SLLA
        (nd_frame(src=IPv6Address("::"), dst=VIP6, options=b""), Reason.BAD_DAD),
    ],
)
def test_malformed_ns(frame: bytes, reason: Reason) -> None:
    assert arp.parse_neighbor_solicitation(frame) == Malformed(reason)


def test_unknown_options_are_skipped() -> None:
    ns = arp.parse_neighbor_solicitation(
        nd_frame(options=b"\x0e\x01" + bytes(6) + b"\x01\x01" + OWN_MAC)
    )
    assert isinstance(ns, arp.NeighborSolicitation)
    assert ns.source_lladdr == OWN_MAC


def test_na_with_solicited_flag_to_multicast_is_malformed() -> None:
    frame = bytearray(arp.build_unsolicited_na(VIP6, VIP_MAC6, OWN_MAC))
    frame[58] |= 0x40  # S
    frame[56:58] = b"\0\0"
    struct.pack_into("!H", frame, 56, arp.icmpv6_checksum(VIP6, arp.ALL_NODES, bytes(frame[54:])))
    assert arp.parse_neighbor_advertisement(bytes(frame)) == Malformed(Reason.BAD_FLAGS)


def test_parse_frame_dispatch() -> None:
    assert arp.parse_frame(b"\x00" * 13) == Malformed(Reason.TRUNCATED)
    assert arp.parse_frame(_with(KERNEL_NS, 12, b"\x88\xa8")) == Malformed(Reason.VLAN_TAGGED)
    assert arp.parse_frame(_with(KERNEL_NS, 12, b"\x08\x00")) == Malformed(Reason.UNKNOWN_ETHERTYPE)


def _ns(**changes: Any) -> arp.NeighborSolicitation:
    ns = arp.parse_neighbor_solicitation(KERNEL_NS)
    assert isinstance(ns, arp.NeighborSolicitation)
    return ns._replace(**changes)


@pytest.mark.parametrize(
    ("ns", "why"),
    [
        (_ns(), None),
        (_ns(source_lladdr=None), None),
        (_ns(target=IPv6Address("fd00:198:18::7")), Ignore.NOT_HOSTED),
        (_ns(eth_src=VIP_MAC6), Ignore.CLUSTER_MAC),
        (_ns(source_lladdr=VIP_MAC6), Ignore.CLUSTER_MAC),
        (_ns(eth_src=arp.BROADCAST_MAC), Ignore.BAD_SENDER),
        (_ns(source_lladdr=arp.ZERO_MAC), Ignore.BAD_SENDER),
    ],
)
def test_ns_ignore_reason(ns: arp.NeighborSolicitation, why: Ignore | None) -> None:
    assert arp.ns_ignore_reason(ns, frozenset({VIP6}), VIP_MAC6) == why


# ------------------------------------------------------------------------------------ fuzzing

PARSERS = (arp.parse_arp, arp.parse_neighbor_solicitation, arp.parse_neighbor_advertisement)
RESULTS = (Malformed, ArpPacket, arp.NeighborSolicitation, arp.NeighborAdvertisement)


def _check_never_raises(frame: bytes) -> None:
    for parse in (*PARSERS, arp.parse_frame):
        result = parse(frame)
        assert isinstance(result, RESULTS)
        if isinstance(result, Malformed):
            assert result.reason in set(Reason)


@settings(max_examples=1000)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(frame: bytes) -> None:
    _check_never_raises(frame)


@settings(max_examples=1000)
@given(st.sampled_from([b"\x08\x06", b"\x86\xdd"]), st.binary(max_size=120))
def test_fuzz_right_ethertype(ethertype: bytes, body: bytes) -> None:
    _check_never_raises(bytes(12) + ethertype + body)


@settings(max_examples=1000)
@given(
    st.sampled_from([KERNEL_ARP_REQUEST, KERNEL_NS, KERNEL_DAD, EXPECTED_NA]),
    st.lists(st.tuples(st.integers(0, 199), st.integers(0, 255)), max_size=4),
    st.integers(0, 100),
)
def test_fuzz_mutated_valid_frames(frame: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    buf = bytearray(frame)
    for pos, value in edits:
        buf[pos % len(buf)] = value
    _check_never_raises(bytes(buf[: len(buf) - cut]))


# ------------------------------------------------------------------------- the kernel filter

OTHER = IPv4Address("198.18.0.7")
OTHER6_SAME_LOW = IPv6Address("fd00:1::100")  # same low 32 bits as VIP6: passes the prefilter
OTHER6 = IPv6Address("fd00:198:18::7")
PROBES = {
    "arp-request-vip": KERNEL_ARP_REQUEST,
    "arp-request-other": arp.encode_arp(request(tpa=OTHER)),
    "arp-reply-vip": arp.encode_arp(request(op=arp.ARP_REPLY)),
    "arp-truncated": KERNEL_ARP_REQUEST[:30],
    "ns-vip6": KERNEL_NS,
    "ns-other6-same-low-word": nd_frame(target=OTHER6_SAME_LOW),
    "ns-other6": nd_frame(target=OTHER6),
    "icmpv6-echo": nd_frame(icmp_type=128),
    "ipv4-udp": _with(KERNEL_ARP_REQUEST, 12, b"\x08\x00"),
    "runt": b"\xff" * 12,
}
TARGETS = {"arp-request-vip", "ns-vip6", "ns-other6-same-low-word"}
REQUESTS = TARGETS | {"arp-request-other", "arp-truncated", "ns-other6"}
PASSES: dict[FilterMode, set[str]] = {
    "targets": TARGETS,
    "requests": REQUESTS,  # a truncated frame still has its op field
    "ethertype": REQUESTS | {"arp-reply-vip", "icmpv6-echo"},
}


def passed(prog: list[tuple[int, int, int, int]], names: list[str]) -> set[str]:
    """Classic BPF runs on AF_UNIX datagrams too: the kernel's verdict, without root."""
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sender, receiver:
        attach_filter(receiver, prog)
        receiver.setblocking(False)
        got: set[str] = set()
        for name in names:
            sender.send(PROBES[name])
            try:
                data = receiver.recv(4096)
            except BlockingIOError:
                continue
            assert data == PROBES[name]
            got.add(name)
        return got


@pytest.mark.parametrize("mode", ["targets", "requests", "ethertype"])
def test_filter_passes_what_the_mode_says(mode: FilterMode) -> None:
    prog = build_filter([VIP, IPv4Address("198.18.0.101")], [VIP6], mode)
    assert passed(prog, list(PROBES)) == PASSES[mode]


@pytest.mark.parametrize("mode", ["targets", "requests", "ethertype"])
def test_filter_without_ipv6_addresses_drops_nd(mode: FilterMode) -> None:
    got = passed(build_filter([VIP], [], mode), list(PROBES))
    assert got == {p for p in PASSES[mode] if p.startswith("arp")}


@pytest.mark.parametrize(
    ("v4", "v6", "mode", "want"),
    [
        ([], [], "ethertype", set()),
        ([], [VIP6], "targets", {"ns-vip6", "ns-other6-same-low-word"}),
    ],
)
def test_filter_by_family(
    v4: list[IPv4Address], v6: list[IPv6Address], mode: FilterMode, want: set[str]
) -> None:
    assert passed(build_filter(v4, v6, mode), list(PROBES)) == want


def test_filter_with_many_addresses_falls_back_to_requests() -> None:
    many = [IPv4Address(int(VIP) + i) for i in range(3000)]
    prog = build_filter(many, [VIP6], "targets")
    assert len(prog) <= BPF_MAXINSNS
    assert passed(prog, list(PROBES)) == PASSES["requests"]
    last = build_filter(many[:1500], [], "targets")
    assert len(last) > 3000  # still per-target: 2 instructions per address
    assert passed(last, ["arp-request-vip", "arp-request-other"]) == {"arp-request-vip"}
