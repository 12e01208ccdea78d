"""The XDP program's maps as the loader writes and reads them.

Owns: the descriptors of a loaded or adopted program and its maps (and closing them), and
what the maps hold as this side writes it: the node entry (``mh_node``: kernel lease in
jiffies, converted with a clock pair read by ``mh_clock``; the cluster interface's MAC; the
build id, read once), the traffic IPs (``mh_addrs``, and the
``mh_vip4`` fast path), the return groups (their ``mh_groups`` entries, and ``mh_ifaces``),
each front group's bucket table written into the inactive half of the mmapped
``mh_buckets`` then published with one ``mh_groups`` update (the double buffer of
:mod:`multihost.dataplane.xdplayout`), and reading the per-CPU verdict counters
(``mh_stats``).

:class:`XdpMaps` is a base of :class:`multihost.dataplane.xdp.XdpDataplane`: it declares
the attributes its methods use, and ``XdpDataplane.__init__`` sets them.

Must not: load, attach, pin or detach the program (:mod:`multihost.dataplane.xdpattach`),
decide what the tables hold (callers hand it the state), or read a file on a lease write.
"""

from __future__ import annotations

import contextlib
import ipaddress
import mmap
import os
import socket
import struct
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from multihost.dataplane import libbpf
from multihost.dataplane.ruleset import RulesetSpec
from multihost.dataplane.xdplayout import (
    ADDR_KEY,
    ADDR_VAL,
    BUCKETS_PER_ELEMENT,
    CLOCKS,
    GROUP,
    HASH_MODES,
    IFACE,
    NODE,
    STATS,
    VIP4_COLLIDE,
    VIP4_SLOTS,
    Verdict,
    vip4_slot,
)
from multihost.dataplane.xdpobject import XdpError, build_id, interface_mac
from multihost.macaddr import parse_mac


def pack(fmt: str, *values: Any) -> bytes:
    """``struct.pack``: the map keys and values of the XDP backend."""
    return struct.pack(fmt, *values)


def addr_key(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    return pack(ADDR_KEY.fmt, addr.version, addr.packed.ljust(16, b"\0"))


#: Resolution of CLOCK_MONOTONIC_COARSE (6 on Linux): the kernel's tick, one jiffy.
TICK_NS = int(time.clock_getres(getattr(time, "CLOCK_MONOTONIC_COARSE", 6)) * 1e9)


def kernel_clocks(clock_fd: int) -> tuple[int, int]:
    """(jiffies, CLOCK_MONOTONIC_COARSE ns), read together by the kernel: one
    ``BPF_PROG_RUN`` of ``mh_clock`` (``clock_fd``), a program that is never attached."""
    _, out, _ = libbpf.test_run(clock_fd, bytes(64))
    jiffies, coarse_ns = struct.unpack_from(CLOCKS.fmt, out)
    return int(jiffies), int(coarse_ns)


def lease_held_now(node_fd: int, clock_fd: int) -> bool:
    """Whether the program takes new flows now: ``mh_node.lease_jiffies`` against the
    kernel's jiffies (what the program compares)."""
    raw = libbpf.map_lookup(node_fd, pack("=I", 0), NODE.size)
    if raw is None:
        return False
    return bool(struct.unpack_from("=Q", raw)[0] > kernel_clocks(clock_fd)[0])


class XdpMaps:
    """The program's and maps' descriptors and the map contents (see module docstring)."""

    spec: RulesetSpec
    _fds: dict[str, int]
    _prog_fd: int | None
    _clock_fd: int | None
    _mm: mmap.mmap | None
    _tables: dict[str, npt.NDArray[np.uint8]]
    _active: dict[str, int]
    _bases: list[tuple[int, int]]
    _lease: int
    _mac: bytes
    _build: bytes | None
    _ncpu: int

    def close(self) -> None:
        """Close our descriptors (an attached, pinned program stays: fail-closed)."""
        if self._mm is not None:
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = {}
        for prog in (self._prog_fd, self._clock_fd):
            if prog is not None:
                with contextlib.suppress(OSError):
                    os.close(prog)
        self._prog_fd = None
        self._clock_fd = None

    # ------------------------------------------------------------------ map writes, reads
    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            raise XdpError("the XDP data plane is not installed")
        return fd

    def _clocks(self) -> tuple[int, int]:
        if self._clock_fd is None:
            raise XdpError("the XDP data plane is not installed")
        return kernel_clocks(self._clock_fd)

    def _lease_jiffies(self, deadline_ns: int) -> int:
        """The ``mh_node.lease_jiffies`` of a CLOCK_MONOTONIC deadline (0: lapsed).

        jiffies and the coarse clock advance together, in the same timekeeping update, one
        tick at a time, and lag real time alike (by up to a tick).  From a pair read
        together, jiffies reaches ``jiffies + k`` when the coarse clock reaches
        ``coarse_ns + k * TICK_NS``.  The program passes while jiffies < ``jiffies + k``;
        with ``(k + 1) * TICK_NS <= deadline_ns - coarse_ns`` it stops by coarse time
        ``deadline_ns - TICK_NS``: one tick early, as the coarse-clock expiry was written,
        so despite the lag it lapses no later than the deadline."""
        jiffies, coarse_ns = self._clocks()
        k = (deadline_ns - coarse_ns) // TICK_NS - 1
        return jiffies + k if k > 0 else 0

    def _write_node(self) -> None:
        if self._build is None:  # read once: a lease write (~10/s) must not read files
            self._build = bytes.fromhex(build_id())
        value = pack(NODE.fmt, self._lease, self._mac, b"\0\0", self._build)
        libbpf.map_update(self._fd("mh_node"), pack("=I", 0), value)

    def _write_addrs(self) -> None:
        slots: dict[int, int] = {}  # mh_vip4 slot -> group + 1 (VIP4_COLLIDE if shared)
        owner: dict[int, bytes] = {}
        for i, addrs in enumerate(self._all_addresses()):
            for a in addrs:
                if a.version == 4:
                    s = vip4_slot(a.packed)
                    slots[s] = VIP4_COLLIDE if s in slots else i + 1
                    owner[s] = a.packed
        fd4 = self._fd("mh_vip4")
        for s in range(VIP4_SLOTS):
            group = slots.get(s, 0)
            value = owner.get(s, bytes(4)) + pack("=I", group)
            libbpf.map_update(fd4, pack("=I", s), value)
        fd = self._fd("mh_addrs")
        want = {addr_key(a): i for i, addrs in enumerate(self._all_addresses()) for a in addrs}
        for key in libbpf.map_keys(fd, ADDR_KEY.size):
            if key not in want:
                libbpf.map_delete(fd, key)
        for key, i in want.items():
            libbpf.map_update(fd, key, pack(ADDR_VAL.fmt, i))

    def _all_addresses(self) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]]:
        """Per group index (front groups, then return groups): its addresses."""
        return [g.addresses for g in self.spec.groups] + [r.addresses for r in self.spec.returns]

    def _write_returns(self) -> None:
        """Return groups: an ``mh_groups`` entry reading the front group's table, and per
        interface the return group of each family with its cluster MAC (``mh_ifaces``)."""
        n = len(self.spec.groups)
        index = {g.name: i for i, g in enumerate(self.spec.groups)}
        ifaces: dict[str, list[Any]] = {}
        for j, r in enumerate(self.spec.returns):
            front = index[r.front]
            b0, b1 = self._bases[front]
            mode = HASH_MODES[r.hash_mode]  # ``table``: the front group's, read for its state
            value = pack(GROUP.fmt, 0, self.spec.buckets, self.spec.seed, mode, b0, b1, front)
            libbpf.map_update(self._fd("mh_groups"), pack("=I", n + j), value)
            row = ifaces.setdefault(r.interface, [0, 0, bytes(6), bytes(6)])
            for family in {a.version for a in r.addresses}:
                at = 0 if family == 4 else 1
                row[at] = n + j + 1
                row[2 + at] = parse_mac(r.mac(family))
        fd = self._fd("mh_ifaces")
        want: dict[bytes, bytes] = {}
        for name, (g4, g6, mac4, mac6) in ifaces.items():
            try:
                ifindex = socket.if_nametoindex(name)
            except OSError:
                raise XdpError(f"return interface {name!r} does not exist") from None
            own = interface_mac(name)
            want[pack("=I", ifindex)] = pack(IFACE.fmt, g4, g6, mac4, mac6, own, b"\0\0")
        for key in libbpf.map_keys(fd, 4):
            if key not in want:
                libbpf.map_delete(fd, key)
        for key, value in want.items():
            libbpf.map_update(fd, key, value)

    def _map_mm(self) -> mmap.mmap:
        if self._mm is None:
            fd = self._fd("mh_buckets")
            size = libbpf.map_max_entries(fd) * BUCKETS_PER_ELEMENT
            size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        return self._mm

    def _read_active(self) -> None:
        for i, g in enumerate(self.spec.groups):
            raw = libbpf.map_lookup(self._fd("mh_groups"), pack("=I", i), GROUP.size)
            self._active[g.name] = struct.unpack(GROUP.fmt, raw)[0] & 1 if raw else 1

    def _publish(self, index: int, name: str) -> None:
        """Write the group's table into the inactive half, then flip (one map update)."""
        half = 1 - self._active.get(name, 1)
        base = self._bases[index][half]
        table = self._tables[name]
        mm = self._map_mm()
        mm[base : base + len(table)] = table.tobytes()
        g = self.spec.groups[index]
        b0, b1 = self._bases[index]
        mode = HASH_MODES[g.hash_mode]
        value = pack(GROUP.fmt, half, self.spec.buckets, self.spec.seed, mode, b0, b1, index)
        libbpf.map_update(self._fd("mh_groups"), pack("=I", index), value)
        self._active[name] = half

    def _percpu(self, group: int) -> list[bytes]:
        stride = (STATS.size + 7) // 8 * 8
        raw = libbpf.map_lookup(self._fd("mh_stats"), pack("=I", group), stride * self._ncpu)
        if raw is None:
            return [bytes(STATS.size)] * self._ncpu
        return [raw[i * stride : i * stride + STATS.size] for i in range(self._ncpu)]

    def _stats(self, group: int) -> tuple[list[int], list[int]]:
        n = len(Verdict)
        packets, nbytes = [0] * n, [0] * n
        for value in self._percpu(group):
            fields = struct.unpack_from(f"={2 * n}Q", value)
            for v in range(n):
                packets[v] += fields[v]
                nbytes[v] += fields[n + v]
        return packets, nbytes
