"""The ARP / Neighbor Discovery responder: a raw AF_PACKET socket on the cluster interface.

Owns: one non-blocking ``AF_PACKET`` socket on the cluster interface (hooked to the ARP
Ethertype, or IPv6 / all only when IPv6 traffic IPs are hosted), its classic BPF
filter (only ARP requests / ICMPv6 Neighbor Solicitations, by default only those for hosted
addresses, reach user space), the link-layer multicast memberships the node needs to *receive*
frames sent to the cluster MAC and to the solicited-node groups of IPv6 traffic IPs (those
live on ``lo``, so the kernel does not join them on the cluster interface), answering requests
for hosted traffic IPs with the cluster multicast MAC, gratuitous announcements, and counters.
Frame layout and the answer-or-ignore decision are :mod:`multihost.dataplane.arp`'s.

Must not: block, sleep, log per frame, raise on received bytes, or touch addresses, routes,
sysctls or the firewall (the VIP on ``lo`` and ``arp_ignore``/``arp_announce`` are set up
elsewhere).  Use from asyncio::

    loop.add_reader(responder.fileno(), responder.on_readable)
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import socket
import struct
from collections import Counter
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv6Address, ip_address
from types import TracebackType
from typing import Literal, Self

from multihost.dataplane import arp

FilterMode = Literal["targets", "requests", "ethertype"]
"""What the kernel passes up: ``targets`` (default) ARP requests / NS for hosted addresses
only (IPv6: prefiltered on the low 32 bits; user space checks exactly); ``requests`` every ARP
request and every NS; ``ethertype`` every ARP frame and every ICMPv6 packet (diagnostics)."""

Address = IPv4Address | IPv6Address
BpfInsn = tuple[int, int, int, int]  # struct sock_filter: code, jt, jf, k

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_DROP_MEMBERSHIP = 2
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23  # Linux >= 4.20
PACKET_MR_MULTICAST = 0
PACKET_OTHERHOST = 3  # unicast to another MAC, seen only in promiscuous mode
PACKET_OUTGOING = 4
SO_ATTACH_FILTER = 26
BPF_MAXINSNS = 4096

# Classic BPF opcodes (linux/bpf_common.h) and ancillary-data offsets (linux/filter.h).
BPF_LD_W_ABS = 0x20
BPF_LD_H_ABS = 0x28
BPF_LD_B_ABS = 0x30
BPF_JMP_JA = 0x05
BPF_JMP_JEQ_K = 0x15
BPF_RET_K = 0x06
SKF_AD_OFF = -0x1000
SKF_AD_PKTTYPE = 4
SKF_AD_VLAN_TAG_PRESENT = 48
BPF_ACCEPT = 0xFFFF  # snap length: every byte of an ARP/ND frame

_TOTALS = (
    "frames",
    "arp_requests",
    "arp_replies",
    "nd_solicitations",
    "nd_advertisements",
    "announcements",
    "skipped_pkttype",
    "recv_errors",
)
_RECV_SIZE = 2048
_PACKET_MREQ = struct.Struct("iHH8s")  # struct packet_mreq
_SOCK_FPROG = struct.Struct("HL")  # struct sock_fprog (native alignment: len, pad, pointer)
_TPACKET_STATS = struct.Struct("II")


def build_filter(
    v4: Iterable[IPv4Address], v6: Iterable[IPv6Address], mode: FilterMode = "targets"
) -> list[BpfInsn]:
    """The classic BPF program for the given hosted addresses.  Pure.

    Drops frames we sent (``PACKET_OUTGOING``), frames to other hosts' unicast MACs
    (``PACKET_OTHERHOST``, seen in promiscuous mode; the kernel ignores them too) and
    802.1Q-tagged frames (they belong to a VLAN sub-interface: the answer would leave
    untagged).  With no address of a family, that family's frames are dropped too.  Falls
    back to ``requests`` if the program would be too long for the kernel.
    """
    v4, v6 = list(v4), list(v6)
    v4_words = sorted({int.from_bytes(a.packed) for a in v4})
    v6_words = sorted({int.from_bytes(a.packed[12:]) for a in v6})
    prog = [
        *_ld_ancillary(SKF_AD_PKTTYPE),
        *_drop_if_eq(PACKET_OUTGOING),
        *_drop_if_eq(PACKET_OTHERHOST),
        *_ld_ancillary(SKF_AD_VLAN_TAG_PRESENT),
        *_drop_unless_eq(0),
        (BPF_LD_H_ABS, 0, 0, 12),
    ]
    arp_part = _arp_section(v4_words, mode) if v4_words else []
    nd_part = _nd_section(v6_words, mode) if v6_words else []
    if arp_part and nd_part:
        # ARP? jump over the ND section; a BPF_JA offset is 32 bits, jt/jf only 8.
        prog += [(BPF_JMP_JEQ_K, 0, 1, arp.ETH_P_ARP), (BPF_JMP_JA, 0, 0, 2 + len(nd_part))]
        prog += [*_drop_unless_eq(arp.ETH_P_IPV6), *nd_part, *arp_part]
    elif arp_part:
        prog += [*_drop_unless_eq(arp.ETH_P_ARP), *arp_part]
    elif nd_part:
        prog += [*_drop_unless_eq(arp.ETH_P_IPV6), *nd_part]
    else:
        prog.append((BPF_RET_K, 0, 0, 0))
    if len(prog) > BPF_MAXINSNS and mode == "targets":
        return build_filter(v4, v6, "requests")
    return prog


def pack_filter(prog: list[BpfInsn]) -> bytes:
    """The ``struct sock_filter[]`` array."""
    return b"".join(struct.pack("HBBI", *insn) for insn in prog)


def attach_filter(sock: socket.socket, prog: list[BpfInsn]) -> None:
    """``SO_ATTACH_FILTER`` (atomically replaces a previous filter; the kernel copies it)."""
    code = ctypes.create_string_buffer(pack_filter(prog))
    fprog = _SOCK_FPROG.pack(len(prog), ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


class Responder:
    """Answers ARP / NS for hosted traffic IPs with the cluster multicast MAC.

    ``vip_mac6`` is the MAC given for IPv6 traffic IPs (``33:33`` + low 32 bits of an IPv6
    group); it defaults to ``vip_mac``.  Needs ``CAP_NET_RAW``; the socket belongs to the
    network namespace of the calling thread.  Not thread-safe: use from one event loop.
    """

    def __init__(
        self,
        interface: str,
        addresses: Iterable[Address | str],
        vip_mac: bytes,
        vip_mac6: bytes | None = None,
        *,
        kernel_filter: FilterMode = "targets",
        join_multicast: bool = True,
    ) -> None:
        for mac in (vip_mac, vip_mac6 or vip_mac):
            if len(mac) != 6 or not mac[0] & 1:
                raise ValueError(f"the cluster MAC must be a multicast MAC, got {mac.hex(':')}")
        self.interface = interface
        self._vip_mac = vip_mac
        self._vip_mac6 = vip_mac6 or vip_mac
        self._mode: FilterMode = kernel_filter
        self._join = join_multicast
        self._v4: frozenset[IPv4Address] = frozenset()
        self._v6: frozenset[IPv6Address] = frozenset()
        self._joined: set[bytes] = set()
        self._counts: Counter[str] = Counter()
        self._malformed: Counter[str] = Counter()
        self._ignored: Counter[str] = Counter()
        self._send_errors: Counter[str] = Counter()
        self._kernel = [0, 0]  # PACKET_STATISTICS: passed the filter, dropped (queue full)
        # Protocol 0: receives nothing until bound, so no frame slips past the filter.
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            self._sock.setblocking(False)
            with contextlib.suppress(OSError):  # kernels < 4.20: the BPF filter drops them
                self._sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            self._ifindex = socket.if_nametoindex(interface)
            self._protocol = 0
            self.set_addresses(addresses)  # attaches the filter, then binds
            self.own_mac: bytes = self._sock.getsockname()[4]
        except BaseException:
            self._sock.close()
            raise

    # --------------------------------------------------------------------------- control

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def protocol(self) -> int:
        """The Ethertype the socket is hooked to: ARP, IPv6, or ETH_P_ALL for both."""
        return self._protocol

    @property
    def addresses(self) -> frozenset[Address]:
        return frozenset[Address]((*self._v4, *self._v6))

    def set_addresses(self, addresses: Iterable[Address | str]) -> None:
        """Replace the hosted traffic IPs: new kernel filter, memberships, answers."""
        v4: set[IPv4Address] = set()
        v6: set[IPv6Address] = set()
        for raw in addresses:
            addr = ip_address(raw)
            if addr.is_multicast or addr.is_unspecified:
                raise ValueError(f"{addr} cannot be a traffic IP")
            if isinstance(addr, IPv4Address):
                v4.add(addr)
            else:
                v6.add(addr)
        attach_filter(self._sock, build_filter(v4, v6, self._mode))
        # The narrowest protocol hook: with IPv4 only, IPv4 data traffic never meets the socket.
        protocol = ETH_P_ALL if v4 and v6 else arp.ETH_P_IPV6 if v6 else arp.ETH_P_ARP
        if protocol != self._protocol:
            self._sock.bind((self.interface, protocol))  # re-binding keeps the fd and queue
            self._protocol = protocol
        if self._join:
            want = {self._vip_mac} if v4 else set()
            if v6:
                want |= {self._vip_mac6, *(arp.solicited_node_mac(a) for a in v6)}
            for mac in sorted(want - self._joined):
                self._membership(PACKET_ADD_MEMBERSHIP, mac)
                self._joined.add(mac)
            for mac in sorted(self._joined - want):
                self._membership(PACKET_DROP_MEMBERSHIP, mac)
                self._joined.discard(mac)
        self._v4, self._v6 = frozenset(v4), frozenset(v6)

    def announce(self) -> int:
        """Gratuitous ARP (a request and a reply) per IPv4 and an unsolicited NA per IPv6
        traffic IP, to broadcast / all-nodes.  Returns the number of frames sent."""
        self._refresh_own_mac()
        sent = 0
        for v4 in sorted(self._v4):
            for op in (arp.ARP_REQUEST, arp.ARP_REPLY):
                frame = arp.build_gratuitous_arp(v4, self._vip_mac, self.own_mac, op)
                sent += self._send(frame, "announcements")
        for v6 in sorted(self._v6):
            sent += self._send(
                arp.build_unsolicited_na(v6, self._vip_mac6, self.own_mac), "announcements"
            )
        return sent

    def counters(self) -> dict[str, int]:
        """Totals plus ``malformed.<reason>``, ``ignored.<reason>``, ``send_errors.<ERRNO>``,
        ``recv_errors.<ERRNO>``; ``kernel_passed``/``kernel_drops`` are the socket's
        PACKET_STATISTICS (frames that passed the BPF filter / were dropped on a full queue)."""
        self._read_kernel_stats()
        out = dict.fromkeys(_TOTALS, 0) | dict(self._counts)  # + "recv_errors.<ERRNO>"
        out["malformed"] = sum(self._malformed.values())
        out["ignored"] = sum(self._ignored.values())
        out["send_errors"] = sum(self._send_errors.values())
        out["kernel_passed"], out["kernel_drops"] = self._kernel
        for prefix, counter in (
            ("malformed", self._malformed),
            ("ignored", self._ignored),
            ("send_errors", self._send_errors),
        ):
            out.update({f"{prefix}.{k}": v for k, v in counter.items()})
        return out

    def close(self) -> None:
        """Close the socket (the kernel drops the memberships with it).  Idempotent."""
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --------------------------------------------------------------------------- data path

    def on_readable(self, max_frames: int = 64) -> int:
        """Handle up to ``max_frames`` queued frames; returns how many were read.

        Bounded so a flood cannot starve the event loop: with a level-triggered reader the
        loop calls again on its next turn while frames remain.
        """
        sock, handled = self._sock, 0
        while handled < max_frames:
            try:
                frame, addr = sock.recvfrom(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:  # e.g. ENETDOWN once when the link goes down
                self._counts["recv_errors"] += 1
                self._counts[f"recv_errors.{_errname(e)}"] += 1
                break
            handled += 1
            if addr[2] in (PACKET_OUTGOING, PACKET_OTHERHOST):  # the filter drops these already
                self._counts["skipped_pkttype"] += 1
                continue
            self.handle_frame(frame)
        return handled

    def handle_frame(self, frame: bytes) -> None:
        """Count and, if it asks for a hosted address, answer one received frame."""
        self._counts["frames"] += 1
        pkt = arp.parse_frame(frame)
        if isinstance(pkt, arp.Malformed):
            self._malformed[pkt.reason] += 1
        elif isinstance(pkt, arp.ArpPacket):
            if pkt.op == arp.ARP_REQUEST:
                self._counts["arp_requests"] += 1
            why = arp.arp_ignore_reason(pkt, self._v4, self._vip_mac)
            if why is not None:
                self._ignored[why] += 1
            else:
                reply = arp.build_arp_reply(pkt, self._vip_mac, self.own_mac)
                self._send(reply, "arp_replies")
        else:
            self._counts["nd_solicitations"] += 1
            why = arp.ns_ignore_reason(pkt, self._v6, self._vip_mac6)
            if why is not None:
                self._ignored[why] += 1
            else:
                advert = arp.build_neighbor_advertisement(pkt, self._vip_mac6, self.own_mac)
                self._send(advert, "nd_advertisements")

    # --------------------------------------------------------------------------- internals

    def _send(self, frame: bytes, counter: str) -> int:
        try:
            self._sock.send(frame)
        except OSError as e:  # ENOBUFS (qdisc full), EAGAIN, ENETDOWN, ENXIO (link gone)
            self._send_errors[_errname(e)] += 1
            return 0
        self._counts[counter] += 1
        return 1

    def _membership(self, op: int, mac: bytes) -> None:
        mreq = _PACKET_MREQ.pack(self._ifindex, PACKET_MR_MULTICAST, len(mac), mac)
        self._sock.setsockopt(SOL_PACKET, op, mreq)

    def _refresh_own_mac(self) -> None:
        with contextlib.suppress(OSError):  # closed socket: keep the last one
            self.own_mac = self._sock.getsockname()[4]

    def _read_kernel_stats(self) -> None:
        if self._sock.fileno() < 0:
            return
        raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _TPACKET_STATS.size)
        passed, drops = _TPACKET_STATS.unpack(raw)  # the kernel resets them on every read
        self._kernel[0] += passed
        self._kernel[1] += drops


def _ld_ancillary(offset: int) -> list[BpfInsn]:
    return [(BPF_LD_W_ABS, 0, 0, (SKF_AD_OFF + offset) & 0xFFFF_FFFF)]


def _drop_if_eq(k: int) -> list[BpfInsn]:
    return [(BPF_JMP_JEQ_K, 0, 1, k), (BPF_RET_K, 0, 0, 0)]


def _drop_unless_eq(k: int) -> list[BpfInsn]:
    return [(BPF_JMP_JEQ_K, 1, 0, k), (BPF_RET_K, 0, 0, 0)]


def _accept_if_eq_chain(words: list[int]) -> list[BpfInsn]:
    """``if A == w: accept`` for each word, then drop (only 1-insn jumps: any length)."""
    out: list[BpfInsn] = []
    for w in words:
        out += [(BPF_JMP_JEQ_K, 0, 1, w), (BPF_RET_K, 0, 0, BPF_ACCEPT)]
    return [*out, (BPF_RET_K, 0, 0, 0)]


def _arp_section(words: list[int], mode: FilterMode) -> list[BpfInsn]:
    if mode == "ethertype":
        return [(BPF_RET_K, 0, 0, BPF_ACCEPT)]
    out = [(BPF_LD_H_ABS, 0, 0, 20), *_drop_unless_eq(arp.ARP_REQUEST)]  # ARP op
    if mode == "requests":
        return [*out, (BPF_RET_K, 0, 0, BPF_ACCEPT)]
    return [*out, (BPF_LD_W_ABS, 0, 0, 38), *_accept_if_eq_chain(words)]  # target IP


def _nd_section(words: list[int], mode: FilterMode) -> list[BpfInsn]:
    out = [(BPF_LD_B_ABS, 0, 0, 20), *_drop_unless_eq(arp.IPPROTO_ICMPV6)]  # next header
    if mode == "ethertype":
        return [*out, (BPF_RET_K, 0, 0, BPF_ACCEPT)]
    out += [(BPF_LD_B_ABS, 0, 0, 54), *_drop_unless_eq(arp.ND_NEIGHBOR_SOLICIT)]  # ICMPv6 type
    if mode == "requests":
        return [*out, (BPF_RET_K, 0, 0, BPF_ACCEPT)]
    return [*out, (BPF_LD_W_ABS, 0, 0, 74), *_accept_if_eq_chain(words)]  # target, low 32 bits


def _errname(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))
