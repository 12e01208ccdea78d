"""The XDP data plane: load, attach, pin and program ``bpf/multihost_xdp.o``.

Owns: finding and checking the compiled object (missing or stale -> :class:`XdpError` that
says to run ``make setup``), loading it through :mod:`multihost.dataplane.libbpf` (verifier
log in the error), attaching it to the cluster interface (native XDP, else generic), pinning
the program and its maps under the node's pin directory so they outlive the agent, adopting
a pinned program at start, writing bucket tables (double-buffered, see
:mod:`multihost.dataplane.xdplayout`), the kernel lease, reading counters and the flows still
held in handover buckets, and detaching + unpinning on a clean stop or ``multihost cleanup``.

:class:`XdpDataplane` has the methods of :class:`multihost.dataplane.nft.Dataplane` that the
agent uses (``install``, ``update``, ``set_lease``, ``lease_held``, ``read_state``,
``counters``, ``flow_rows``, ``remove``, ``close``, ``describe``), so either backend drops in.

Fail-closed without an nft hook: the program stays attached when the agent dies (netlink XDP
attachment is not tied to a process), and its lease (``mh_node.lease_expires_ns``, compared
with ``bpf_ktime_get_coarse_ns()``, written one tick early) lapses by itself, after which
the node takes no new flow -- before any peer may declare it dead.

Must not: decide ownership, render nft rules, or touch any interface but the one it is given
(in the calling thread's network namespace, or ``netns``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import ipaddress
import mmap
import os
import socket
import struct
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from multihost.dataplane import libbpf
from multihost.dataplane.libbpf import BpfError, BpfObject
from multihost.dataplane.nft import UpdateStats, netns_entered
from multihost.dataplane.ruleset import SET_KINDS, GroupBuckets, RulesetSpec, check_state
from multihost.dataplane.xdplayout import (
    ACCEPTED,
    ADDR_KEY,
    ADDR_VAL,
    BUCKETS_PER_ELEMENT,
    DROPPED,
    FLOW_KEY,
    FLOW_VAL,
    GROUP,
    HASH_MODES,
    IFACE,
    LEASE_FOREVER,
    MAP_NAMES,
    NODE,
    PROGRAM_NAME,
    STATS,
    VIP4_COLLIDE,
    VIP4_SLOTS,
    BucketState,
    Verdict,
    bucket_elements,
    group_bases,
    limits_problem,
    vip4_slot,
)
from multihost.macaddr import parse_mac

BPF_DIR = Path(__file__).resolve().parent / "bpf"
SOURCE = BPF_DIR / "multihost_xdp.c"
HEADER = BPF_DIR / "multihost_layout.h"
OBJECT = BPF_DIR / "multihost_xdp.o"
BPF_FS_MAGIC = 0xCAFE4A11
BTF_PATH = Path("/sys/kernel/btf/vmlinux")
_SIOCGIFHWADDR = 0x8927
_STATE_CODE = {
    "owned": BucketState.OWNED,
    "draining": BucketState.DRAINING,
    "incoming": BucketState.INCOMING,
}
#: UDP flows seen in a draining bucket within this many seconds still count as live
#: (conntrack's unreplied UDP timeout).
UDP_FLOW_LIVE_S = 30.0
Row = tuple[str, int, str, int, int, int | None]  # as conntrack.Row: proto is a number
#: Resolution of CLOCK_MONOTONIC_COARSE (6 on Linux; the program's bpf_ktime_get_coarse_ns).
_COARSE_NS = int(time.clock_getres(getattr(time, "CLOCK_MONOTONIC_COARSE", 6)) * 1e9)


class XdpError(RuntimeError):
    """The XDP backend cannot run here, or an operation failed; the message says why."""


def build_id(source: Path = SOURCE, header: Path = HEADER) -> str:
    """What the object must have been built from: sha256 of the header then the source
    (the Makefile computes the same with ``cat header source | sha256sum``)."""
    return hashlib.sha256(header.read_bytes() + source.read_bytes()).hexdigest()


def object_build_id(obj: Path) -> str | None:
    """The build id compiled into an object file (``mh_build`` section), None if absent."""
    data = obj.read_bytes()
    at = data.find(b"MHBUILD:")
    if at < 0:
        return None
    return data[at + 8 : at + 8 + 64].decode(errors="replace")


def check_object(obj: Path = OBJECT) -> None:
    """Raise :class:`XdpError` if the object is missing or was built from other sources."""
    if not obj.exists():
        raise XdpError(f"XDP object {obj} is missing: build it with `make setup` (needs clang)")
    try:
        want = build_id()
    except OSError as e:
        raise XdpError(f"XDP program source unreadable: {e}") from e
    got = object_build_id(obj)
    if got != want:
        raise XdpError(
            f"XDP object {obj} is stale (built from other sources than {SOURCE.name}): "
            "rebuild it with `make setup`"
        )


def unavailable_reason(obj: Path = OBJECT) -> str | None:
    """Why this machine cannot run the XDP backend (None: it can, as far as a probe without
    loading can tell): no libbpf, no kernel BTF, object missing or stale, not root."""
    try:
        libbpf.lib()
    except BpfError as e:
        return str(e)
    if not BTF_PATH.exists():
        return f"the kernel has no BTF ({BTF_PATH} is missing; needs CONFIG_DEBUG_INFO_BTF)"
    try:
        check_object(obj)
    except XdpError as e:
        return str(e)
    if os.geteuid() != 0:
        return "loading XDP programs needs root (CAP_BPF and CAP_NET_ADMIN)"
    return None


def is_bpffs(path: Path) -> bool:
    """Whether ``path`` (an existing directory) is on a BPF filesystem."""
    try:
        import ctypes
        import ctypes.util

        class _Statfs(ctypes.Structure):
            _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]

        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        buf = _Statfs()
        if libc.statfs(str(path).encode(), ctypes.byref(buf)) != 0:
            return False
        return bool((int(buf.f_type) & 0xFFFFFFFF) == BPF_FS_MAGIC)
    except OSError:
        return False


def interface_mac(name: str) -> bytes:
    """The interface's own MAC (SIOCGIFHWADDR, in the calling thread's namespace)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = fcntl.ioctl(s.fileno(), _SIOCGIFHWADDR, struct.pack("256s", name.encode()))
        except OSError as e:
            raise XdpError(f"interface {name!r}: cannot read its MAC: {e.strerror}") from e
    return raw[18:24]


def interface_driver(name: str) -> str:
    """The interface's driver name (ETHTOOL_GDRVINFO), '' if it has none or will not say."""
    import array

    drvinfo = array.array("B", struct.pack("I", 3) + bytes(192))  # ETHTOOL_GDRVINFO
    addr, _ = drvinfo.buffer_info()
    ifreq = struct.pack("16sP", name.encode(), addr)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            fcntl.ioctl(s.fileno(), 0x8946, ifreq)  # SIOCETHTOOL
        except OSError:
            return ""
    return bytes(drvinfo[4:36]).split(b"\0")[0].decode(errors="replace")


def auto_modes(driver: str) -> tuple[str, ...]:
    """Attach modes ``auto`` tries, in order.  veth: generic only -- its native XDP runs on
    skbs that keep the ``pkt_type`` the bridge side gave them (``eth_type_trans`` never
    resets it to PACKET_HOST), so TCP would discard every passed packet of the cluster's
    multicast MAC; generic XDP re-classifies a frame whose destination MAC changed."""
    return ("generic",) if driver == "veth" else ("native", "generic")


@dataclass(frozen=True)
class Attached:
    """Where the program runs: ``mode`` native or generic, kernel program id."""

    ifindex: int
    mode: str
    program_id: int
    adopted: bool  # found pinned and attached at start, kept


def _pack(fmt: str, *values: Any) -> bytes:
    return struct.pack(fmt, *values)


def addr_key(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    return _pack(ADDR_KEY.fmt, addr.version, addr.packed.ljust(16, b"\0"))


class XdpDataplane:
    """The node's XDP program and maps, kept in step with ``state`` (see module docstring).

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
        else:  # one coarse tick early: the program reads the coarse clock (see the C)
            self._lease = time.monotonic_ns() + int(expires_ms) * 1_000_000 - _COARSE_NS
            self._lease = max(self._lease, 1)
        self._write_node()

    def lease_held(self) -> bool:
        raw = libbpf.map_lookup(self._fd("mh_node"), _pack("=I", 0), NODE.size)
        if raw is None:
            return False
        return bool(struct.unpack_from("=Q", raw)[0] > time.monotonic_ns())

    def read_state(self) -> dict[str, GroupBuckets]:
        """The active tables as the kernel holds them (for checks)."""
        out: dict[str, GroupBuckets] = {}
        for i, g in enumerate(self.spec.groups):
            raw = libbpf.map_lookup(self._fd("mh_groups"), _pack("=I", i), GROUP.size)
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

    def remove(self) -> None:
        """Clean stop: detach the program (if it is still ours) and unpin everything."""
        with netns_entered(self.netns):
            for a in (self.attached, *self.extra_attached.values()):
                if a is not None:
                    with contextlib.suppress(BpfError):
                        if libbpf.xdp_query_id(a.ifindex) == a.program_id:
                            libbpf.xdp_detach(a.ifindex, _mode_flags(a.mode))
            unpin(self.pin_dir)
        self.attached = None
        self.extra_attached = {}
        self._state = None
        self.close()

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
        if self._prog_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._prog_fd)
            self._prog_fd = None

    # ------------------------------------------------------------------ loading
    def _open(self) -> None:
        try:
            ifindex = socket.if_nametoindex(self.interface)
        except OSError:
            raise XdpError(f"interface {self.interface!r} does not exist") from None
        self._mac = interface_mac(self.interface)
        adopted = self._adopt(ifindex)
        self.attached = adopted if adopted is not None else self._load_and_attach(ifindex)
        try:
            self._attach_extra()
        except Exception:
            self.remove() if adopted is None else self.close()
            raise

    def _attach_extra(self) -> None:
        """Run the program on the return groups' interfaces too (same program, same maps)."""
        assert self._prog_fd is not None and self.attached is not None
        pid = self.attached.program_id
        for name in self.extra_interfaces:
            try:
                ifindex = socket.if_nametoindex(name)
            except OSError:
                raise XdpError(f"return interface {name!r} does not exist") from None
            current = libbpf.xdp_query_id(ifindex)
            if current == pid:
                native = libbpf.xdp_query_id(ifindex, libbpf.XDP_FLAGS_DRV_MODE)
                self.extra_attached[name] = Attached(
                    ifindex, "native" if native else "generic", pid, adopted=True
                )
                continue
            old_fd = self._old_program(current, name)
            try:
                mode = self._attach(ifindex, self._prog_fd, old_fd, name)
            finally:
                if old_fd is not None:
                    os.close(old_fd)
            self.extra_attached[name] = Attached(ifindex, mode, pid, adopted=False)

    def _adopt(self, ifindex: int) -> Attached | None:
        """Reuse the pinned program and maps if they are ours, current and attached here."""
        prog_pin = self.pin_dir / "prog"
        if not prog_pin.exists():
            return None
        fds: dict[str, int] = {}
        prog_fd = None
        try:
            prog_fd = libbpf.obj_get(str(prog_pin))
            pid = libbpf.prog_id(prog_fd)
            if libbpf.xdp_query_id(ifindex) != pid:
                raise XdpError("pinned program is not the one attached")
            for name in MAP_NAMES:
                fds[name] = libbpf.obj_get(str(self.pin_dir / name))
            raw = libbpf.map_lookup(fds["mh_node"], _pack("=I", 0), NODE.size)
            if raw is None or raw[16:48] != bytes.fromhex(build_id()):
                raise XdpError("pinned program was built from other sources")
            need = bucket_elements([self.spec.buckets] * len(self.spec.groups))
            if libbpf.map_max_entries(fds["mh_buckets"]) < need:
                raise XdpError("pinned bucket map is too small for this configuration")
            mode = (
                "native" if libbpf.xdp_query_id(ifindex, libbpf.XDP_FLAGS_DRV_MODE) else "generic"
            )
        except (BpfError, XdpError, OSError):
            for fd in fds.values():
                os.close(fd)
            if prog_fd is not None:
                os.close(prog_fd)
            return None
        self._fds, self._prog_fd = fds, prog_fd
        self._read_active()
        return Attached(ifindex, mode, pid, adopted=True)

    def _load_and_attach(self, ifindex: int) -> Attached:
        check_object(self.obj_path)
        if not BTF_PATH.exists():
            raise XdpError(f'the kernel has no BTF ({BTF_PATH}); use dataplane = "nft"')
        current = libbpf.xdp_query_id(ifindex)
        old_fd = self._old_program(current)
        try:
            obj = BpfObject(str(self.obj_path))
        except BpfError as e:
            raise XdpError(f"cannot open XDP object {self.obj_path}: {e}") from e
        try:
            obj.set_max_entries(
                "mh_buckets", bucket_elements([self.spec.buckets] * len(self.spec.groups))
            )
            obj.capture_log(PROGRAM_NAME)
            try:
                obj.load()
            except BpfError as e:
                raise XdpError(f"the kernel refused the XDP program: {e}") from e
            fds = {name: os.dup(obj.map_fd(name)) for name in MAP_NAMES}
            prog_fd = os.dup(obj.program_fd(PROGRAM_NAME))
        except BpfError as e:  # an object without our maps or program
            raise XdpError(f"XDP object {self.obj_path} does not match this loader: {e}") from e
        finally:
            obj.close()
        self._fds, self._prog_fd = fds, prog_fd
        self._active = {g.name: 1 for g in self.spec.groups}  # first publish writes half 0
        try:
            self._write_node()
            mode = self._attach(ifindex, prog_fd, old_fd)
        except Exception:
            self.close()
            raise
        finally:
            if old_fd is not None:
                os.close(old_fd)
        try:
            self._pin()
        except Exception as e:
            with contextlib.suppress(BpfError):
                libbpf.xdp_detach(ifindex, _mode_flags(mode))
            self.close()
            raise XdpError(f"cannot pin the XDP program under {self.pin_dir}: {e}") from e
        return Attached(ifindex, mode, libbpf.prog_id(prog_fd), adopted=False)

    def _old_program(self, current: int, interface: str | None = None) -> int | None:
        """The fd of the program now attached, if it is multihost's (to replace it
        atomically); XdpError if it is somebody else's."""
        if not current:
            return None
        prog_pin = self.pin_dir / "prog"
        if prog_pin.exists():
            with contextlib.suppress(BpfError, OSError):
                fd = libbpf.obj_get(str(prog_pin))
                if libbpf.prog_id(fd) == current:
                    return fd
                os.close(fd)
        fd = libbpf.prog_fd_by_id(current)
        name = libbpf.obj_info(fd)[64:80].split(b"\0")[0].decode(errors="replace")
        if name == PROGRAM_NAME:
            return fd  # multihost's, pinned elsewhere or not at all
        os.close(fd)
        raise XdpError(
            f"interface {interface or self.interface!r} already runs XDP program id {current} "
            f"({name!r}), "
            'not multihost\'s: detach it (ip link set dev IFACE xdp off) or use dataplane = "nft"'
        )

    def _attach(
        self, ifindex: int, prog_fd: int, old_fd: int | None, interface: str | None = None
    ) -> str:
        interface = interface or self.interface
        modes = {
            "auto": auto_modes(interface_driver(interface)),
            "native": ("native",),
            "generic": ("generic",),
        }
        errors: list[str] = []
        for mode in modes[self.mode]:
            try:
                libbpf.xdp_attach(ifindex, prog_fd, _mode_flags(mode), old_fd)
                return mode
            except BpfError as e:
                errors.append(f"{mode}: {e}")
                if old_fd is not None and e.errno == errno.EEXIST:
                    break
        raise XdpError(f"cannot attach XDP to {interface!r}: " + "; ".join(errors))

    def _pin(self) -> None:
        assert self._prog_fd is not None
        unpin(self.pin_dir)
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        if not is_bpffs(self.pin_dir):
            raise XdpError(f"{self.pin_dir} is not on a BPF filesystem (mount -t bpf bpf DIR)")
        libbpf.obj_pin(self._prog_fd, str(self.pin_dir / "prog"))
        for name, fd in self._fds.items():
            libbpf.obj_pin(fd, str(self.pin_dir / name))

    # ------------------------------------------------------------------ map writes
    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            raise XdpError("the XDP data plane is not installed")
        return fd

    def _write_node(self) -> None:
        if self._build is None:  # read once: a lease write (~10/s) must not read files
            self._build = bytes.fromhex(build_id())
        value = _pack(NODE.fmt, self._lease, self._mac, b"\0\0", self._build)
        libbpf.map_update(self._fd("mh_node"), _pack("=I", 0), value)

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
            value = owner.get(s, bytes(4)) + _pack("=I", group)
            libbpf.map_update(fd4, _pack("=I", s), value)
        fd = self._fd("mh_addrs")
        want = {addr_key(a): i for i, addrs in enumerate(self._all_addresses()) for a in addrs}
        for key in libbpf.map_keys(fd, ADDR_KEY.size):
            if key not in want:
                libbpf.map_delete(fd, key)
        for key, i in want.items():
            libbpf.map_update(fd, key, _pack(ADDR_VAL.fmt, i))

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
            value = _pack(GROUP.fmt, 0, self.spec.buckets, self.spec.seed, mode, b0, b1, front)
            libbpf.map_update(self._fd("mh_groups"), _pack("=I", n + j), value)
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
            want[_pack("=I", ifindex)] = _pack(IFACE.fmt, g4, g6, mac4, mac6, own, b"\0\0")
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
            raw = libbpf.map_lookup(self._fd("mh_groups"), _pack("=I", i), GROUP.size)
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
        value = _pack(GROUP.fmt, half, self.spec.buckets, self.spec.seed, mode, b0, b1, index)
        libbpf.map_update(self._fd("mh_groups"), _pack("=I", index), value)
        self._active[name] = half

    def _percpu(self, group: int) -> list[bytes]:
        stride = (STATS.size + 7) // 8 * 8
        raw = libbpf.map_lookup(self._fd("mh_stats"), _pack("=I", group), stride * self._ncpu)
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


_PROTO_NAMES = {
    6: "tcp",
    17: "udp",
    132: "sctp",
    33: "dccp",
    136: "udplite",
    1: "icmp",
    58: "icmpv6",
}


def _mode_flags(mode: str) -> int:
    return libbpf.XDP_FLAGS_DRV_MODE if mode == "native" else libbpf.XDP_FLAGS_SKB_MODE


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


def unpin(pin_dir: Path) -> None:
    """Remove a pin directory's pins (and the directory); fine if it is absent."""
    if not pin_dir.is_dir():
        return
    for name in ("prog", *MAP_NAMES):
        with contextlib.suppress(FileNotFoundError):
            (pin_dir / name).unlink()
    with contextlib.suppress(OSError):
        pin_dir.rmdir()


def cleanup(
    interface: str,
    pin_dir: Path,
    netns: str | None = None,
    extra_interfaces: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Detach multihost's XDP program from ``interface`` (and the return groups'
    ``extra_interfaces``) and unpin ``pin_dir`` (the ``multihost cleanup`` command); returns
    what was done.  Leaves foreign programs alone."""
    done: dict[str, Any] = {"interface": interface, "detached": None, "unpinned": False}
    with netns_entered(netns):
        done["detached"] = _detach_ours(interface)
        if extra_interfaces:
            done["return_interfaces"] = {i: _detach_ours(i) for i in extra_interfaces}
        if pin_dir.exists():
            unpin(pin_dir)
            done["unpinned"] = True
    return done


def _detach_ours(interface: str) -> int | None:
    """Detach multihost's program from ``interface`` (its id), if it runs there."""
    try:
        ifindex = socket.if_nametoindex(interface)
    except OSError:
        return None
    current = libbpf.xdp_query_id(ifindex)
    if not current:
        return None
    fd = libbpf.prog_fd_by_id(current)
    try:
        name = libbpf.obj_info(fd)[64:80].split(b"\0")[0].decode(errors="replace")
    finally:
        os.close(fd)
    if name != PROGRAM_NAME:
        return None
    for flags in (libbpf.XDP_FLAGS_DRV_MODE, libbpf.XDP_FLAGS_SKB_MODE):
        if libbpf.xdp_query_id(ifindex, flags) == current:
            libbpf.xdp_detach(ifindex, flags)
    return int(current)


@contextlib.contextmanager
def opened(dp: XdpDataplane) -> Iterator[XdpDataplane]:
    """Close (not remove) on exit: for tools that only read a pinned data plane."""
    try:
        yield dp
    finally:
        dp.close()
