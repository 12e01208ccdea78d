"""The XDP data plane: the node's program and maps, kept in step with the bucket state.

Owns: :class:`XdpDataplane`, the XDP backend as the agent sees it -- installing (load and
attach, or adopt the pinned program, then write every table and the lease last), updating
the changed groups' bucket tables (double-buffered, see
:mod:`multihost.dataplane.xdplayout`), the kernel lease, reading back the active tables, the
counters and the flows still held in handover buckets (TCP from sock_diag, UDP from
``mh_udp_flows``), and ``BPF_PROG_RUN`` of the loaded program for tests.  Its parts live
next to it: the compiled object and what this machine can run
(:mod:`multihost.dataplane.xdpobject`), loading, attaching, pinning and detaching
(:mod:`multihost.dataplane.xdpattach`, whose :func:`~multihost.dataplane.xdpattach.cleanup`
serves ``multihost cleanup``), and writing and reading the maps
(:mod:`multihost.dataplane.xdpmaps`).

:class:`XdpDataplane` has the methods of :class:`multihost.dataplane.nft.Dataplane` that the
agent uses (``install``, ``update``, ``set_lease``, ``lease_held``, ``read_state``,
``counters``, ``flow_rows``, ``remove``, ``close``, ``describe``), so either backend drops in.

Fail-closed without an nft hook: the program stays attached when the agent dies (netlink XDP
attachment is not tied to a process), and its lease (``mh_node.lease_jiffies``, compared
with ``bpf_jiffies64()``, one load; converted from the agent's CLOCK_MONOTONIC deadline one
tick early) lapses by itself, after which the node takes no new flow -- before any peer may
declare it dead.

Must not: decide ownership, render nft rules, or touch any interface but the one it is given
(in the calling thread's network namespace, or ``netns``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import mmap
import os
import socket
import struct
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from multihost.dataplane import libbpf
from multihost.dataplane.nft import UpdateStats, netns_entered
from multihost.dataplane.ruleset import SET_KINDS, GroupBuckets, RulesetSpec, check_state
from multihost.dataplane.xdpattach import Attached, XdpAttachment
from multihost.dataplane.xdplayout import (
    ACCEPTED,
    DROPPED,
    FLOW_KEY,
    FLOW_VAL,
    GROUP,
    LEASE_FOREVER,
    BucketState,
    Verdict,
    group_bases,
    limits_problem,
)
from multihost.dataplane.xdpmaps import lease_held_now, pack
from multihost.dataplane.xdpobject import OBJECT, XdpError

_STATE_CODE = {
    "owned": BucketState.OWNED,
    "draining": BucketState.DRAINING,
    "incoming": BucketState.INCOMING,
}
#: UDP flows seen in a draining bucket within this many seconds still count as live
#: (conntrack's unreplied UDP timeout).
UDP_FLOW_LIVE_S = 30.0
Row = tuple[str, int, str, int, int, int | None]  # as conntrack.Row: proto is a number


class XdpDataplane(XdpAttachment):
    """The node's XDP program and maps, kept in step with ``state`` (see module docstring);
    ``remove`` (detach + unpin) comes from :class:`~multihost.dataplane.xdpattach.XdpAttachment`,
    ``close`` from :class:`~multihost.dataplane.xdpmaps.XdpMaps`.

    ``pin_dir``: where the program and maps are pinned (must be on a BPF filesystem); the
    directory is created.  ``mode``: ``auto`` (native, else generic), ``native`` or
    ``generic``.  ``netns``: operate on ``interface`` in that namespace (tests, benches).
    """

    backend = "xdp"
    #: ``set_lease`` is one array-map write of a fixed value (no allocation, never blocks)
    #: and touches no state the table updates use: the agent writes it on its event loop.
    lease_inline = True

    def __init__(
        self,
        spec: RulesetSpec,
        interface: str,
        pin_dir: Path,
        *,
        netns: str | None = None,
        mode: str = "auto",
        obj: Path = OBJECT,
    ) -> None:
        spec.check()
        if mode not in ("auto", "native", "generic"):
            raise XdpError(f"XDP mode {mode!r}: use auto, native or generic")
        naddr = sum(len(g.addresses) for g in spec.groups) + sum(
            len(r.addresses) for r in spec.returns
        )
        problem = limits_problem(len(spec.groups) + len(spec.returns), spec.buckets, naddr)
        if problem is not None:
            raise XdpError(problem[1])
        #: Interfaces of return groups other than ``interface``: the program runs there too.
        self.extra_interfaces = tuple(sorted({r.interface for r in spec.returns} - {interface}))
        self.extra_attached: dict[str, Attached] = {}
        self.spec = spec
        self.interface = interface
        self.pin_dir = Path(pin_dir)
        self.netns = netns
        self.mode = mode
        self.obj_path = obj
        self._fds: dict[str, int] = {}
        self._prog_fd: int | None = None
        self._clock_fd: int | None = None
        self._mm: mmap.mmap | None = None
        self._state: dict[str, GroupBuckets] | None = None
        self._tables: dict[str, npt.NDArray[np.uint8]] = {}
        self._active: dict[str, int] = {}
        self._bases = group_bases([spec.buckets] * len(spec.groups))
        self._lease: int = LEASE_FOREVER
        self._mac = b"\0" * 6
        self._build: bytes | None = None  # the sources' build id, as written to mh_node
        self.attached: Attached | None = None
        self._ncpu = _possible_cpus()

    # ------------------------------------------------------------------ life cycle
    @property
    def state(self) -> dict[str, GroupBuckets] | None:
        return None if self._state is None else dict(self._state)

    def describe(self) -> dict[str, Any]:
        a = self.attached
        return {
            "backend": "xdp",
            "mode": a.mode if a else None,
            "program_id": a.program_id if a else None,
            "interface": self.interface,
            "return_interfaces": list(self.extra_interfaces),
            "pin_dir": str(self.pin_dir),
            "adopted": a.adopted if a else False,
        }

    def install(self, state: Mapping[str, GroupBuckets], spec: RulesetSpec | None = None) -> float:
        """Load + attach (or adopt the pinned program) and write every table; seconds taken.

        On any error nothing new stays attached or pinned (the previous program, if one was
        attached, is left as it was)."""
        if spec is not None and spec != self.spec:
            raise XdpError("the XDP backend cannot change groups in place: restart the agent")
        full = check_state(self.spec, state)
        t0 = time.perf_counter()
        with netns_entered(self.netns):
            if self.attached is None:
                self._open()
            self._write_addrs()
            for i, g in enumerate(self.spec.groups):
                self._tables[g.name] = _table(full[g.name], self.spec.buckets)
                self._publish(i, g.name)
            self._write_returns()
            # The lease last: an adopted program still holds the dead agent's tables, which
            # must never be served with a fresh lease (its buckets may be another node's).
            self._write_node()
        self._state = full
        return time.perf_counter() - t0

    def update(self, state: Mapping[str, GroupBuckets]) -> UpdateStats:
        """Write the changed groups' tables (inactive half, then one flip each)."""
        if self._state is None:
            raise XdpError("update() before install()")
        t0 = time.perf_counter()
        full = check_state(self.spec, state)
        added = removed = 0
        changed: list[tuple[int, str]] = []
        for i, g in enumerate(self.spec.groups):
            old, new = self._state[g.name], full[g.name]
            if old is new or old == new:
                continue
            table = self._tables[g.name].copy()
            for kind in SET_KINDS:
                gone = old.of(kind) - new.of(kind)
                came = new.of(kind) - old.of(kind)
                if gone:
                    table[np.fromiter(gone, np.int64, len(gone))] = 0
                    removed += len(gone)
            for kind in SET_KINDS:
                came = new.of(kind) - old.of(kind)
                if came:
                    table[np.fromiter(came, np.int64, len(came))] = _STATE_CODE[kind]
                    added += len(came)
            self._tables[g.name] = table
            changed.append((i, g.name))
        t1 = time.perf_counter()
        for i, name in changed:
            self._publish(i, name)
        t2 = time.perf_counter()
        self._state = full
        return UpdateStats(added, removed, t1 - t0, t2 - t1, "mmap" if changed else "none")

    def set_lease(self, expires_ms: int | None) -> None:
        """``None`` held without expiry, ``> 0`` for that many ms, ``<= 0`` lapsed now."""
        if self._state is None:
            raise XdpError("set_lease() before install()")
        if expires_ms is None:
            self._lease = LEASE_FOREVER
        elif expires_ms <= 0:
            self._lease = 0
        else:  # in jiffies, one tick early (see _lease_jiffies and the C)
            deadline = time.monotonic_ns() + int(expires_ms) * 1_000_000
            self._lease = self._lease_jiffies(deadline)
        self._write_node()

    def lease_held(self) -> bool:
        """Whether the program takes new flows now (its lease against the kernel's jiffies)."""
        if self._clock_fd is None:
            raise XdpError("the XDP data plane is not installed")
        return lease_held_now(self._fd("mh_node"), self._clock_fd)

    def read_state(self) -> dict[str, GroupBuckets]:
        """The active tables as the kernel holds them (for checks)."""
        out: dict[str, GroupBuckets] = {}
        for i, g in enumerate(self.spec.groups):
            raw = libbpf.map_lookup(self._fd("mh_groups"), pack("=I", i), GROUP.size)
            if raw is None:
                raise XdpError(f"group {g.name}: no entry in mh_groups")
            active, buckets, _seed, _mode, b0, b1, _table = struct.unpack(GROUP.fmt, raw)
            base = (b0, b1)[active & 1]
            mm = self._map_mm()
            table = np.frombuffer(mm, np.uint8, buckets, base)
            kinds = {
                k: frozenset(int(x) for x in np.flatnonzero(table == c))
                for k, c in _STATE_CODE.items()
            }
            out[g.name] = GroupBuckets(**kinds)
        return out

    def counters(self) -> dict[str, dict[str, int]]:
        """Per group: ``accepted``/``dropped`` packets and bytes (as the nft backend), and
        ``xdp_<verdict>_packets`` / ``_bytes`` for each verdict."""
        out: dict[str, dict[str, int]] = {}
        names = [g.name for g in self.spec.groups] + [r.name for r in self.spec.returns]
        for i, name in enumerate(names):
            packets, nbytes = self._stats(i)
            row: dict[str, int] = {
                "accepted_packets": sum(packets[v] for v in ACCEPTED),
                "accepted_bytes": sum(nbytes[v] for v in ACCEPTED),
                "dropped_packets": sum(packets[v] for v in DROPPED),
                "dropped_bytes": sum(nbytes[v] for v in DROPPED),
            }
            for v in Verdict:
                row[f"xdp_{v.name.lower()}_packets"] = packets[v]
                row[f"xdp_{v.name.lower()}_bytes"] = nbytes[v]
            out[name] = row
        return out

    def last_hashed(self, group: int, cpu: int) -> tuple[int, int]:
        """(bucket, state) of the last packet of ``group`` hashed on ``cpu`` (tests)."""
        values = self._percpu(group)
        last_bucket, last_state = struct.unpack_from("=II", values[cpu], 2 * 8 * len(Verdict))
        return last_bucket, last_state

    def flow_rows(self) -> list[Row]:
        """Flows this node still holds to its traffic IPs, as conntrack rows: TCP
        connections (sock_diag) and UDP flows seen in handover buckets in the last
        :data:`UDP_FLOW_LIVE_S` seconds (older ones are removed).  Blocks: run in a thread."""
        from multihost.dataplane.sockdiag import dump_sockets

        addrs = frozenset(a for g in self.spec.groups for a in g.addresses)
        with netns_entered(self.netns):
            rows: list[Row] = list(dump_sockets(addrs))
        fd = self._fd("mh_udp_flows")
        now = time.monotonic_ns()
        for key in libbpf.map_keys(fd, FLOW_KEY.size):
            val = libbpf.map_lookup(fd, key, FLOW_VAL.size)
            if val is None:
                continue
            (seen,) = struct.unpack(FLOW_VAL.fmt, val)
            if now - seen > UDP_FLOW_LIVE_S * 1e9:
                libbpf.map_delete(fd, key)
                continue
            saddr, daddr, sport, dport, family, proto, _ = struct.unpack(FLOW_KEY.fmt, key)
            n = 4 if family == 4 else 16
            rows.append(
                (
                    str(ipaddress.ip_address(saddr[:n])),
                    socket.ntohs(sport),
                    str(ipaddress.ip_address(daddr[:n])),
                    socket.ntohs(dport),
                    proto,
                    None,
                )
            )
        return rows

    def test_run(
        self, frame: bytes, repeat: int = 1, interface: str | None = None
    ) -> tuple[int, bytes, int]:
        """``BPF_PROG_RUN`` of the loaded program on one frame: (verdict, frame out, ns);
        ``interface``: the frame arrives there (default: as from loopback)."""
        if self._prog_fd is None:
            raise XdpError("the XDP data plane is not installed")
        with netns_entered(self.netns):
            index = socket.if_nametoindex(interface) if interface else 0
            return libbpf.test_run(self._prog_fd, frame, repeat=repeat, ingress_ifindex=index)


def _table(gb: GroupBuckets, buckets: int) -> npt.NDArray[np.uint8]:
    table = np.zeros(buckets, np.uint8)
    for kind, code in _STATE_CODE.items():
        members = gb.of(kind)
        if members:
            table[np.fromiter(members, np.int64, len(members))] = code
    return table


def _possible_cpus() -> int:
    """Number of possible CPUs (per-CPU map values come in this many copies)."""
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


@contextlib.contextmanager
def opened(dp: XdpDataplane) -> Iterator[XdpDataplane]:
    """Close (not remove) on exit: for tools that only read a pinned data plane."""
    try:
        yield dp
    finally:
        dp.close()
