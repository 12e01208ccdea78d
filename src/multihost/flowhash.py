"""Bit-exact model of the kernel's flow hash: nft ``jhash <fields> mod B seed S``.

Owns: Linux ``jhash()`` (include/linux/jhash.h, Bob Jenkins' lookup3 as adapted for the
kernel), the byte layout of the nft register key, ``reciprocal_scale`` (how nft maps the
32-bit hash to ``mod B``), the fields hashed for each hash mode, and parsing of flow
specifications (``198.18.0.2:40000-198.18.0.100:80``, ``[2001:db8::1]:1-[2001:db8::2]:80``).

Must not: touch the kernel or know about ownership; ``dataplane.rulesettables`` renders the nft
expression from :func:`hash_fields`, so the model and the rule cannot drift apart.

Key layout (nft registers): every field takes a whole number of 4-byte register slots.
IPv4 addresses are 4 bytes in network order, IPv6 addresses 16; ports are 2 bytes
big-endian followed by two zero bytes.  An IPv4 4-tuple key is 16 bytes, IPv6 is 40.
``jhash`` reads 32-bit words in the CPU's byte order (little-endian on x86 and arm64) with
``initval = 0xdeadbeef + len + seed``; nft's bucket is ``(hash * B) >> 32``, not ``hash % B``.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from enum import StrEnum

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_M32 = 0xFFFFFFFF
JHASH_INITVAL = 0xDEADBEEF

#: Protocols whose first 4 transport bytes are source and destination port.
PORT_PROTOCOLS = frozenset({"tcp", "udp", "sctp", "dccp", "udplite"})
PROTOCOLS = PORT_PROTOCOLS | {"icmp", "icmpv6", "other"}


class FlowError(ValueError):
    """A flow specification or hash parameter that cannot be used (the message says why)."""


class HashMode(StrEnum):
    """Which fields of a flow choose its bucket (configuration key ``hash``)."""

    FOUR_TUPLE = "4-tuple"
    THREE_TUPLE = "3-tuple"  # no source port: a client's connections stick to one node
    SOURCE_IP = "source-ip"
    # Keyed on the client side only, so that a return group (IP transparency, a back end's
    # reply addressed to the client) hashing the *destination* lands in the same bucket:
    SOURCE_IP_PORT = "source-ip-port"  # client address + port (front group)
    DESTINATION_IP = "destination-ip"  # return group of a source-ip front group
    DESTINATION_IP_PORT = "destination-ip-port"  # return group of a source-ip-port one


#: Front group mode -> the return group mode that hashes a reply to the same bucket: the
#: reply's destination is the client, so its (daddr, dport) words are the request's
#: (saddr, sport) words, in the same order, padding and length.  Modes not listed here
#: hash the traffic IP or its port, which a back end's reply does not carry.
RETURN_MODES = {
    HashMode.SOURCE_IP: HashMode.DESTINATION_IP,
    HashMode.SOURCE_IP_PORT: HashMode.DESTINATION_IP_PORT,
}


def hash_fields(mode: HashMode, has_ports: bool) -> tuple[str, ...]:
    """Ordered key fields (``saddr``, ``sport``, ``daddr``, ``dport``) for a packet.

    Packets without ports (ICMP echo, GRE, ...) hash on the addresses only, so an ICMP echo
    exchange is answered by exactly one node (the client-side modes: on the client's address
    only, as their return modes on the reply's destination address).
    """
    if mode is HashMode.SOURCE_IP:
        return ("saddr",)
    if mode is HashMode.DESTINATION_IP:
        return ("daddr",)
    if mode is HashMode.SOURCE_IP_PORT:
        return ("saddr", "sport") if has_ports else ("saddr",)
    if mode is HashMode.DESTINATION_IP_PORT:
        return ("daddr", "dport") if has_ports else ("daddr",)
    if not has_ports:
        return ("saddr", "daddr")
    if mode is HashMode.THREE_TUPLE:
        return ("saddr", "daddr", "dport")
    return ("saddr", "sport", "daddr", "dport")


def _rol32(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M32


def jhash(key: bytes, initval: int) -> int:
    """Linux ``jhash(key, len(key), initval)`` on a little-endian CPU."""
    length = len(key)
    a = b = c = (JHASH_INITVAL + length + initval) & _M32
    k = 0
    while length > 12:
        wa, wb, wc = struct.unpack_from("<III", key, k)
        a = (a + wa) & _M32
        b = (b + wb) & _M32
        c = (c + wc) & _M32
        # __jhash_mix
        a = (a - c) & _M32
        a ^= _rol32(c, 4)
        c = (c + b) & _M32
        b = (b - a) & _M32
        b ^= _rol32(a, 6)
        a = (a + c) & _M32
        c = (c - b) & _M32
        c ^= _rol32(b, 8)
        b = (b + a) & _M32
        a = (a - c) & _M32
        a ^= _rol32(c, 16)
        c = (c + b) & _M32
        b = (b - a) & _M32
        b ^= _rol32(a, 19)
        a = (a + c) & _M32
        c = (c - b) & _M32
        c ^= _rol32(b, 4)
        b = (b + a) & _M32
        length -= 12
        k += 12
    if length == 0:
        return c
    tail = key[k:] + bytes(12 - length)
    wa, wb, wc = struct.unpack("<III", tail)
    a = (a + wa) & _M32
    b = (b + wb) & _M32
    c = (c + wc) & _M32
    # __jhash_final
    c ^= b
    c = (c - _rol32(b, 14)) & _M32
    a ^= c
    a = (a - _rol32(c, 11)) & _M32
    b ^= a
    b = (b - _rol32(a, 25)) & _M32
    c ^= b
    c = (c - _rol32(b, 16)) & _M32
    a ^= c
    a = (a - _rol32(c, 4)) & _M32
    b ^= a
    b = (b - _rol32(a, 14)) & _M32
    c ^= b
    c = (c - _rol32(b, 24)) & _M32
    return int(c)


def reciprocal_scale(value: int, modulus: int) -> int:
    """The kernel's ``reciprocal_scale``: ``(value * modulus) >> 32``."""
    return int(((value & _M32) * modulus) >> 32)


@dataclass(frozen=True)
class Flow:
    """A packet's addresses and ports as seen arriving at the traffic IP."""

    saddr: IPAddress
    sport: int
    daddr: IPAddress
    dport: int
    proto: str = "tcp"

    def __post_init__(self) -> None:
        if self.saddr.version != self.daddr.version:
            raise FlowError(f"address families differ: {self.saddr} and {self.daddr}")
        if self.proto not in PROTOCOLS:
            raise FlowError(f"unknown protocol {self.proto!r} (one of {sorted(PROTOCOLS)})")
        for name, port in (("source port", self.sport), ("destination port", self.dport)):
            if not 0 <= port <= 0xFFFF:
                raise FlowError(f"{name} {port} is outside 0..65535")

    @property
    def has_ports(self) -> bool:
        return self.proto in PORT_PROTOCOLS


def _port_slot(port: int) -> bytes:
    return struct.pack(">H", port) + b"\x00\x00"


def flow_key(flow: Flow, mode: HashMode = HashMode.FOUR_TUPLE) -> bytes:
    """The nft register bytes that ``jhash`` hashes for this flow."""
    parts = {
        "saddr": flow.saddr.packed,
        "daddr": flow.daddr.packed,
        "sport": _port_slot(flow.sport),
        "dport": _port_slot(flow.dport),
    }
    return b"".join(parts[f] for f in hash_fields(mode, flow.has_ports))


def flow_hash(flow: Flow, seed: int, mode: HashMode = HashMode.FOUR_TUPLE) -> int:
    if not 0 <= seed <= _M32:
        raise FlowError(f"seed {seed:#x} is not a 32-bit value")
    return jhash(flow_key(flow, mode), seed)


def flow_bucket(flow: Flow, buckets: int, seed: int, mode: HashMode = HashMode.FOUR_TUPLE) -> int:
    """The bucket the kernel rule ``jhash ... mod buckets seed seed`` gives this flow."""
    if not 1 <= buckets <= _M32:
        raise FlowError(f"bucket count {buckets} is outside 1..2^32-1")
    return reciprocal_scale(flow_hash(flow, seed, mode), buckets)


_ENDPOINT = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<v4>[0-9.]+)):(?P<port>\d{1,5})$")


def parse_endpoint(text: str) -> tuple[IPAddress, int]:
    m = _ENDPOINT.match(text.strip())
    if not m:
        raise FlowError(f"endpoint {text!r} is not ADDR:PORT or [IPV6]:PORT")
    addr_text = m.group("v6") or m.group("v4")
    try:
        addr = ipaddress.ip_address(addr_text)
    except ValueError as e:
        raise FlowError(f"endpoint {text!r}: {e}") from None
    if m.group("v6") and addr.version != 6:
        raise FlowError(f"endpoint {text!r}: brackets are for IPv6 addresses")
    port = int(m.group("port"))
    if port > 0xFFFF:
        raise FlowError(f"endpoint {text!r}: port {port} is outside 0..65535")
    return addr, port


def parse_flow(text: str, proto: str = "tcp") -> Flow:
    """Parse ``SRC:PORT-DST:PORT`` (IPv6 as ``[addr]:port``) into a :class:`Flow`."""
    # The separator is the '-' that follows a port digit and precedes an address.
    m = re.match(r"^(?P<src>.+?:\d{1,5})-(?P<dst>[\[0-9].*)$", text.strip())
    if not m:
        raise FlowError(f"flow {text!r} is not SRC:PORT-DST:PORT")
    saddr, sport = parse_endpoint(m.group("src"))
    daddr, dport = parse_endpoint(m.group("dst"))
    return Flow(saddr, sport, daddr, dport, proto)
