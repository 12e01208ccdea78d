"""Decoding of the sock_diag TCP dump (multihost.dataplane.sockdiag), on bytes built here."""

from __future__ import annotations

import errno
import socket
import struct
from collections import Counter
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from multihost.dataplane import nfcounters as nc
from multihost.dataplane import sockdiag as sd
from multihost.dataplane.conntrack import GroupFlows, Row, buckets_in_use
from multihost.flowhash import HashMode

TCP = socket.IPPROTO_TCP


def _nlmsg(kind: int, body: bytes, seq: int = 1) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 2, seq, 4242) + body


def _sock(family: int, state: int, here: tuple[str, int], peer: tuple[str, int]) -> bytes:
    """One ``inet_diag_msg`` reply (local ``here``, remote ``peer``), laid out field by
    field as in linux/inet_diag.h."""
    (src, sport), (dst, dport) = here, peer
    raw_src, raw_dst = (socket.inet_pton(family, a).ljust(16, b"\0") for a in (src, dst))
    body = struct.pack("=BBBB", family, state, 0, 0)
    body += struct.pack(">HH", sport, dport) + raw_src + raw_dst
    body += struct.pack("=I", 0) + bytes(8)  # idiag_if, idiag_cookie
    body += struct.pack("=IIIII", 0, 0, 0, 0, 12345)  # expires, rqueue, wqueue, uid, inode
    assert len(body) == 72
    return _nlmsg(sd.SOCK_DIAG_BY_FAMILY, body)


def _done() -> bytes:
    return _nlmsg(nc.NLMSG_DONE, struct.pack("=i", 0))


def _decode(buf: bytes, local: frozenset[IPv4Address | IPv6Address] | None = None) -> list[Row]:
    out: list[Row] = []
    assert sd.decode_dump(buf + _done(), out, local)
    return out


def test_v4_socket_is_a_row_from_the_client_side() -> None:
    buf = _sock(socket.AF_INET, sd.TCP_ESTABLISHED, ("198.18.0.100", 80), ("198.18.1.7", 40001))
    assert _decode(buf) == [("198.18.1.7", 40001, "198.18.0.100", 80, TCP, None)]


def test_v6_socket_and_mapped_v4_on_a_v6_socket() -> None:
    buf = _sock(socket.AF_INET6, sd.TCP_ESTABLISHED, ("fd00:198:18::100", 443), ("fd00::7", 50000))
    buf += _sock(
        socket.AF_INET6, sd.TCP_CLOSE_WAIT, ("::ffff:198.18.0.100", 8080), ("::ffff:10.1.2.3", 3)
    )
    assert _decode(buf) == [
        ("fd00::7", 50000, "fd00:198:18::100", 443, TCP, None),
        ("10.1.2.3", 3, "198.18.0.100", 8080, TCP, None),
    ]


def test_multi_message_buffer_skips_listeners_and_finished_states() -> None:
    v4 = socket.AF_INET
    states = [
        sd.TCP_ESTABLISHED,
        sd.TCP_LISTEN,
        sd.TCP_SYN_RECV,
        sd.TCP_TIME_WAIT,
        sd.TCP_FIN_WAIT2,
        sd.TCP_CLOSE,
        sd.TCP_LAST_ACK,
    ]
    buf = b"".join(_sock(v4, s, ("198.18.0.100", 80), ("198.18.1.1", 1000 + s)) for s in states)
    kept = [s for s in states if s not in sd.SKIPPED_STATES]
    assert _decode(buf) == [("198.18.1.1", 1000 + s, "198.18.0.100", 80, TCP, None) for s in kept]


def test_dump_spans_receives_until_done() -> None:
    out: list[Row] = []
    first = _sock(socket.AF_INET, sd.TCP_ESTABLISHED, ("198.18.0.100", 80), ("198.18.1.1", 1))
    second = _sock(socket.AF_INET, sd.TCP_SYN_SENT, ("198.18.0.100", 2), ("198.18.1.1", 22))
    assert not sd.decode_dump(first, out)
    assert sd.decode_dump(second + _done() + first, out)  # nothing after DONE is read
    assert [r[1] for r in out] == [1, 22]


def test_local_filter_keeps_only_traffic_ips() -> None:
    buf = _sock(socket.AF_INET, sd.TCP_ESTABLISHED, ("198.18.0.100", 80), ("198.18.1.1", 1))
    buf += _sock(socket.AF_INET, sd.TCP_ESTABLISHED, ("198.18.1.1", 1), ("198.18.0.100", 80))
    buf += _sock(
        socket.AF_INET6, sd.TCP_ESTABLISHED, ("::ffff:198.18.0.100", 81), ("::ffff:1.2.3.4", 5)
    )
    buf += _sock(socket.AF_INET6, sd.TCP_ESTABLISHED, ("::1", 82), ("::1", 6))
    local = frozenset({ip_address("198.18.0.100"), ip_address("::1")})
    assert _decode(buf, local) == [
        ("198.18.1.1", 1, "198.18.0.100", 80, TCP, None),
        ("1.2.3.4", 5, "198.18.0.100", 81, TCP, None),
        ("::1", 6, "::1", 82, TCP, None),
    ]
    assert _decode(buf, frozenset()) == []


def test_error_reply_raises_and_ack_is_ignored() -> None:
    with pytest.raises(sd.SockDiagError, match="sock_diag dump refused") as info:
        sd.decode_dump(_nlmsg(nc.NLMSG_ERROR, struct.pack("=i", -errno.EINVAL) + bytes(16)), [])
    assert info.value.errno == errno.EINVAL
    out: list[Row] = []
    ack = _nlmsg(nc.NLMSG_ERROR, struct.pack("=i", 0) + bytes(16))
    assert not sd.decode_dump(ack, out) and out == []


def test_malformed_replies_raise() -> None:
    with pytest.raises(sd.SockDiagError, match="malformed"):
        sd.decode_dump(struct.pack("=IHHII", 8, sd.SOCK_DIAG_BY_FAMILY, 2, 1, 0), [])
    with pytest.raises(sd.SockDiagError, match="short inet_diag_msg"):
        sd.decode_dump(_nlmsg(sd.SOCK_DIAG_BY_FAMILY, bytes(40)), [])


def test_request_layout() -> None:
    req = sd.encode_request(socket.AF_INET6, 7)
    size, kind, flags, seq, pid = struct.unpack_from("=IHHII", req)
    assert (size, kind, flags, seq, pid) == (len(req), 20, 0x301, 7, 0) and len(req) == 16 + 56
    family, proto, ext, pad, states = struct.unpack_from("=BBBBI", req, 16)
    assert (family, proto, ext, pad) == (socket.AF_INET6, TCP, 0, 0)
    assert req[24:] == bytes(48)  # an all-zero inet_diag_sockid: no socket filter
    held = {s for s in range(1, 13) if states >> s & 1}
    assert held == set(range(1, 13)) - {sd.TCP_LISTEN, sd.TCP_TIME_WAIT, sd.TCP_CLOSE}
    assert states & 1 == 0 and states >> 13 == 0


def test_rows_map_to_buckets_like_conntrack_rows() -> None:
    vip = IPv4Address("198.18.0.100")
    groups = {"web": GroupFlows(frozenset({vip}), HashMode.FOUR_TUPLE)}
    buf = _sock(
        socket.AF_INET6, sd.TCP_ESTABLISHED, (f"::ffff:{vip}", 80), ("::ffff:198.18.1.9", 7)
    )
    rows = _decode(buf)
    conntrack_row: Row = ("198.18.1.9", 7, str(vip), 80, TCP, 3)  # an ESTABLISHED ct entry
    expect = buckets_in_use([conntrack_row], groups, 40320, 0x5EED)
    assert buckets_in_use(rows, groups, 40320, 0x5EED) == expect
    assert sum(expect["web"].values()) == 1 and isinstance(expect["web"], Counter)
