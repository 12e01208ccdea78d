"""Flow sets and frames for the data-plane benchmark (pure, vectorised; bench only).

Owns: a numpy version of the two kernel hashes the benchmark must predict, so it can choose
flows a node owns -- nft's ``jhash ip saddr . th sport . ip daddr . th dport mod B seed S``
(checked against :func:`multihost.flowhash.flow_bucket`, the project's bit-exact model) and
xt_cluster's ``jhash_1word(original saddr, seed)`` scaled to ``total_nodes``
(``net/netfilter/xt_cluster.c``); random flow sets; the IPv4 header checksums; the 8-byte
flow entries :mod:`bench.bpfgen` stamps into frames; the template UDP frame.

Must not: touch the kernel, sockets or namespaces.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from multihost.flowhash import JHASH_INITVAL, Flow, flow_bucket, jhash

U32 = npt.NDArray[np.uint32]
POOL = ipaddress.IPv4Network("198.18.128.0/17")  # client source addresses of generated flows
FRAME_PAYLOAD = 18  # 14 + 20 + 8 + 18 = 60 bytes: the minimum Ethernet frame without FCS


def _rol(x: U32, k: int) -> U32:
    return (x << np.uint32(k)) | (x >> np.uint32(32 - k))


def _final(a: U32, b: U32, c: U32) -> U32:
    c ^= b
    c -= _rol(b, 14)
    a ^= c
    a -= _rol(c, 11)
    b ^= a
    b -= _rol(a, 25)
    c ^= b
    c -= _rol(b, 16)
    a ^= c
    a -= _rol(c, 4)
    b ^= a
    b -= _rol(a, 14)
    c ^= b
    c -= _rol(b, 24)
    return c


def _mix(a: U32, b: U32, c: U32) -> tuple[U32, U32, U32]:
    a -= c
    a ^= _rol(c, 4)
    c += b
    b -= a
    b ^= _rol(a, 6)
    a += c
    c -= b
    c ^= _rol(b, 8)
    b += a
    a -= c
    a ^= _rol(c, 16)
    c += b
    b -= a
    b ^= _rol(a, 19)
    a += c
    c -= b
    c ^= _rol(b, 4)
    b += a
    return a, b, c


def _le_word(packed: npt.NDArray[np.uint8]) -> U32:
    """Rows of 4 wire bytes read as little-endian u32 (what jhash reads on x86)."""
    return np.ascontiguousarray(packed).view("<u4").reshape(-1).astype(np.uint32)


def _port_word(ports: npt.NDArray[np.uint16]) -> U32:
    """A port as nft stores it in a register: 2 bytes big-endian then 2 zero bytes."""
    p = ports.astype(np.uint32)
    return ((p >> np.uint32(8)) | ((p & np.uint32(0xFF)) << np.uint32(8))).astype(np.uint32)


def _scale(h: U32, modulus: int) -> npt.NDArray[np.int64]:
    return ((h.astype(np.uint64) * np.uint64(modulus)) >> np.uint64(32)).astype(np.int64)


def nft_buckets(
    saddr: npt.NDArray[np.uint8],
    sport: npt.NDArray[np.uint16],
    daddr: bytes,
    dport: int,
    *,
    buckets: int,
    seed: int,
) -> npt.NDArray[np.int64]:
    """Bucket of each flow under the 4-tuple nft rule (``saddr``: rows of 4 wire bytes)."""
    n = len(sport)
    init = np.full(n, (JHASH_INITVAL + 16 + seed) & 0xFFFFFFFF, dtype=np.uint32)
    w0 = _le_word(saddr)
    w1 = _port_word(sport)
    w2 = np.full(n, struct.unpack("<I", daddr)[0], dtype=np.uint32)
    w3 = _port_word(np.full(n, dport, dtype=np.uint16))
    with np.errstate(over="ignore"):
        a, b, c = _mix(init + w0, init + w1, init + w2)
        h = _final(a + w3, b, c)
    return _scale(h, buckets)


def xt_cluster_nodes(saddr: npt.NDArray[np.uint8], total: int, seed: int) -> npt.NDArray[np.int64]:
    """0-based xt_cluster node of each source address (``--cluster-local-node`` is +1)."""
    n = len(saddr)
    init = np.full(n, (JHASH_INITVAL + 4 + seed) & 0xFFFFFFFF, dtype=np.uint32)
    with np.errstate(over="ignore"):
        h = _final(init + _le_word(saddr), init.copy(), init.copy())
    return _scale(h, total)


def self_check(daddr: ipaddress.IPv4Address, dport: int, buckets: int, seed: int) -> None:
    """Compare the vectorised hashes with the project's scalar model on random flows."""
    rng = np.random.default_rng(7)
    s, p = random_tuples(rng, 64)
    got = nft_buckets(s, p, daddr.packed, dport, buckets=buckets, seed=seed)
    nodes = xt_cluster_nodes(s, 8, seed)
    for i in range(len(p)):
        src = ipaddress.IPv4Address(bytes(s[i]))
        want = flow_bucket(Flow(src, int(p[i]), daddr, dport, "udp"), buckets, seed)
        if int(got[i]) != want:
            raise AssertionError(f"vectorised jhash disagrees for {src}:{p[i]}")
        if int(nodes[i]) != (jhash(src.packed, seed) * 8) >> 32:
            raise AssertionError(f"xt_cluster hash disagrees for {src}")


def random_tuples(
    rng: np.random.Generator, n: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint16]]:
    """``n`` distinct (source address in :data:`POOL`, source port >= 1024) pairs."""
    base = int(POOL.network_address)
    seen: set[int] = set()
    addrs: list[int] = []
    ports: list[int] = []
    while len(addrs) < n:
        a = rng.integers(0, POOL.num_addresses, size=n, dtype=np.int64)
        p = rng.integers(1024, 65536, size=n, dtype=np.int64)
        for x, y in zip(a.tolist(), p.tolist(), strict=True):
            if (x << 16 | y) not in seen and len(addrs) < n:
                seen.add(x << 16 | y)
                addrs.append(base + x)
                ports.append(y)
    packed = np.array(addrs, dtype=">u4").view(np.uint8).reshape(-1, 4)
    return packed, np.array(ports, dtype=np.uint16)


Keep = Callable[[npt.NDArray[np.uint8], npt.NDArray[np.uint16]], npt.NDArray[np.bool_]]


@dataclass(frozen=True)
class FlowSet:
    """Source address rows (4 wire bytes each) and source ports of ``len`` flows."""

    name: str
    saddr: npt.NDArray[np.uint8]
    sport: npt.NDArray[np.uint16]

    def __len__(self) -> int:
        return len(self.sport)


def pick(name: str, rng: np.random.Generator, n: int, keep: Keep) -> FlowSet:
    """``n`` random flows for which ``keep(saddr, sport)`` (a vectorised predicate) holds."""
    got_s: list[npt.NDArray[np.uint8]] = []
    got_p: list[npt.NDArray[np.uint16]] = []
    have = 0
    seen: set[tuple[bytes, int]] = set()
    while have < n:
        s, p = random_tuples(rng, 4 * n)
        mask = keep(s, p)
        for row, port in zip(s[mask], p[mask], strict=True):
            key = (row.tobytes(), int(port))
            if key in seen or have >= n:
                continue
            seen.add(key)
            got_s.append(row)
            got_p.append(port)
            have += 1
    return FlowSet(name, np.array(got_s, dtype=np.uint8), np.array(got_p, dtype=np.uint16))


def ip_header(saddr: bytes, daddr: bytes, checksum: int = 0) -> bytes:
    total = 20 + 8 + FRAME_PAYLOAD
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0x4000, 64, 17, checksum, saddr, daddr)


def ip_checksum(header: bytes) -> int:
    s = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return int(~s & 0xFFFF)


def flow_entries(flows: FlowSet, daddr: bytes) -> list[bytes]:
    """The 8-byte map values of :mod:`bench.bpfgen`: saddr, IPv4 checksum, sport (wire)."""
    out = []
    for row, port in zip(flows.saddr, flows.sport, strict=True):
        src = row.tobytes()
        csum = ip_checksum(ip_header(src, daddr))
        out.append(src + struct.pack("!HH", csum, int(port)))
    return out


def udp_frame(dst_mac: bytes, src_mac: bytes, daddr: bytes, dport: int, flows: FlowSet) -> bytes:
    """The template frame (first flow filled in; the generator overwrites it per frame)."""
    src = flows.saddr[0].tobytes()
    ip = ip_header(src, daddr, ip_checksum(ip_header(src, daddr)))
    udp = struct.pack("!HHHH", int(flows.sport[0]), dport, 8 + FRAME_PAYLOAD, 0)
    return dst_mac + src_mac + b"\x08\x00" + ip + udp + bytes(FRAME_PAYLOAD)


def single_udp_frame(dst_mac: bytes, flow: Flow) -> bytes:
    """One frame of one IPv4 UDP ``multihost.flowhash.Flow`` (the same 60-byte layout)."""
    src, dst = flow.saddr.packed, flow.daddr.packed
    ip = ip_header(src, dst, ip_checksum(ip_header(src, dst)))
    udp = struct.pack("!HHHH", flow.sport, flow.dport, 8 + FRAME_PAYLOAD, 0)
    return dst_mac + bytes(6) + b"\x08\x00" + ip + udp + bytes(FRAME_PAYLOAD)
