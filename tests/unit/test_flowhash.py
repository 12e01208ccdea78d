"""The flow-hash model: jhash golden vectors, key layout, reciprocal_scale, parsing.

The jhash vectors were cross-checked against an independent C transcription of
include/linux/jhash.h (900/900 random keys of 0..255 bytes agreed); the data-plane tests
check the model against the kernel's nft jhash flow by flow.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from multihost.flowhash import (
    RETURN_MODES,
    Flow,
    FlowError,
    HashMode,
    flow_bucket,
    flow_hash,
    flow_key,
    hash_fields,
    jhash,
    parse_flow,
    reciprocal_scale,
)

SEED = 0x5EED1234


@pytest.mark.parametrize(
    ("key_hex", "seed", "expected"),
    [
        ("", 0, 0xDEADBEEF),
        ("01020304", 0, 0x043FCDDD),
        ("000102030405060708090a0b0c0d0e0f", SEED, 0x211F4AB2),
        ("".join(f"{i:02x}" for i in range(40)), 1, 0x412D93D3),
    ],
)
def test_jhash_golden(key_hex: str, seed: int, expected: int) -> None:
    assert jhash(bytes.fromhex(key_hex), seed) == expected


@pytest.mark.parametrize(
    ("flow", "proto", "mode", "hashed", "bucket"),
    [
        ("198.18.0.2:40000-198.18.0.100:80", "tcp", "4-tuple", 0xAC150697, 27102),
        ("198.18.0.2:40000-198.18.0.100:80", "tcp", "3-tuple", 0xC365E032, 30775),
        ("198.18.0.2:40000-198.18.0.100:80", "tcp", "source-ip", 0xD8680074, 34083),
        ("198.18.0.3:12345-198.18.0.100:443", "tcp", "4-tuple", 0x94496B22, 23355),
        ("198.18.1.7:5353-198.18.0.100:53", "udp", "4-tuple", 0x945B1E58, 23366),
        ("[2001:db8::1]:40000-[2001:db8::100]:80", "tcp", "4-tuple", 0xD66796C3, 33768),
        ("198.18.0.2:0-198.18.0.100:0", "icmp", "4-tuple", 0xBE95A63D, 30017),
        # client-side modes (IP transparency): a request and the back end's reply to it
        ("198.18.0.2:40000-198.18.0.100:80", "tcp", "source-ip-port", 0x2076CFA7, 5113),
        ("198.19.0.101:8080-198.18.0.2:40000", "tcp", "destination-ip-port", 0x2076CFA7, 5113),
        ("198.19.0.101:8080-198.18.0.2:40000", "tcp", "destination-ip", 0xD8680074, 34083),
        ("198.18.0.2:0-198.18.0.100:0", "icmp", "source-ip-port", 0xD8680074, 34083),
        ("[2001:db8::1]:40000-[2001:db8::100]:80", "tcp", "source-ip-port", 0xFD1402EB, 39859),
        ("[2001:db8:1::5]:80-[2001:db8::1]:40000", "udp", "destination-ip-port", 0xFD1402EB, 39859),
        ("[2001:db8:1::5]:80-[2001:db8::1]:40000", "tcp", "destination-ip", 0x4B508E75, 11862),
    ],
)
def test_flow_golden(flow: str, proto: str, mode: str, hashed: int, bucket: int) -> None:
    f = parse_flow(flow, proto)
    assert flow_hash(f, SEED, HashMode(mode)) == hashed
    assert flow_bucket(f, 40320, SEED, HashMode(mode)) == bucket


def test_key_layout_ipv4() -> None:
    f = parse_flow("198.18.0.2:40000-198.18.0.100:80")
    key = flow_key(f)
    assert len(key) == 16
    assert key == bytes([198, 18, 0, 2, 0x9C, 0x40, 0, 0, 198, 18, 0, 100, 0, 80, 0, 0])


def test_key_layout_ipv6_is_40_bytes() -> None:
    f = parse_flow("[2001:db8::1]:1-[2001:db8::2]:2")
    assert len(flow_key(f)) == 40
    assert flow_key(f)[16:20] == b"\x00\x01\x00\x00"


def test_fields_per_mode() -> None:
    assert hash_fields(HashMode.FOUR_TUPLE, True) == ("saddr", "sport", "daddr", "dport")
    assert hash_fields(HashMode.THREE_TUPLE, True) == ("saddr", "daddr", "dport")
    assert hash_fields(HashMode.SOURCE_IP, True) == ("saddr",)
    assert hash_fields(HashMode.FOUR_TUPLE, False) == ("saddr", "daddr")
    assert hash_fields(HashMode.SOURCE_IP_PORT, True) == ("saddr", "sport")
    assert hash_fields(HashMode.SOURCE_IP_PORT, False) == ("saddr",)
    assert hash_fields(HashMode.DESTINATION_IP_PORT, True) == ("daddr", "dport")
    assert hash_fields(HashMode.DESTINATION_IP_PORT, False) == ("daddr",)
    assert hash_fields(HashMode.DESTINATION_IP, True) == ("daddr",)


def test_return_modes_mirror_the_fields() -> None:
    """A return mode hashes the destination words where its front mode hashes the source
    words, in the same order: the same key bytes, so the same bucket."""
    swap = {"saddr": "daddr", "sport": "dport"}
    for front, ret in RETURN_MODES.items():
        for ports in (True, False):
            assert hash_fields(ret, ports) == tuple(swap[f] for f in hash_fields(front, ports))
    for mode in (HashMode.FOUR_TUPLE, HashMode.THREE_TUPLE):
        assert mode not in RETURN_MODES  # they hash the traffic IP: no reply carries it


_V4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
_V6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
_PORT = st.integers(0, 65535)


@given(
    st.sampled_from([_V4, _V6]).flatmap(lambda a: st.tuples(a, a, a, a)),
    st.tuples(_PORT, _PORT, _PORT, _PORT),
    st.sampled_from(["tcp", "udp", "sctp", "icmp", "icmpv6", "other"]),
    st.integers(0, 2**32 - 1),
    st.sampled_from([40320, 720720, 7]),
)
def test_reply_lands_in_the_request_bucket(
    addrs: tuple[ipaddress.IPv4Address, ...],
    ports: tuple[int, int, int, int],
    proto: str,
    seed: int,
    buckets: int,
) -> None:
    """Request client -> traffic IP, reply back end -> client (any back end, any port):
    the front mode's bucket of the request is the return mode's bucket of the reply."""
    client, vip, backend, _ = addrs
    cport, vport, bport, _ = ports
    request = Flow(client, cport, vip, vport, proto)
    reply = Flow(backend, bport, client, cport, proto)
    for front, ret in RETURN_MODES.items():
        assert flow_key(request, front) == flow_key(reply, ret)
        assert flow_bucket(request, buckets, seed, front) == flow_bucket(reply, buckets, seed, ret)


def test_reciprocal_scale_is_not_modulo() -> None:
    assert reciprocal_scale(0xFFFFFFFF, 40320) == 40319
    assert reciprocal_scale(0, 40320) == 0
    assert reciprocal_scale(0x80000000, 40320) == 20160


@given(st.integers(0, 2**32 - 1), st.integers(1, 65535))
def test_reciprocal_scale_range(h: int, n: int) -> None:
    assert 0 <= reciprocal_scale(h, n) < n


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("198.18.0.2-198.18.0.100:80", "not SRC:PORT-DST:PORT"),
        ("198.18.0.2:70000-198.18.0.100:80", "outside 0..65535"),
        ("198.18.0.2:1-[2001:db8::1]:80", "families differ"),
        ("198.18.0.999:1-198.18.0.100:80", "198.18.0.999"),
        ("[198.18.0.1]:1-198.18.0.100:80", "brackets are for IPv6"),
        ("nonsense", "not SRC:PORT-DST:PORT"),
    ],
)
def test_bad_flows(text: str, message: str) -> None:
    with pytest.raises(FlowError, match=message):
        parse_flow(text)


def test_bad_proto_and_seed() -> None:
    a = ipaddress.ip_address("198.18.0.1")
    with pytest.raises(FlowError, match="unknown protocol"):
        Flow(a, 1, a, 2, "gre")
    with pytest.raises(FlowError, match="32-bit"):
        flow_hash(Flow(a, 1, a, 2), 2**32)
