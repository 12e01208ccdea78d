"""Getting the XDP program onto the node's interfaces, and off them again.

Owns: loading ``bpf/multihost_xdp.o`` through :mod:`multihost.dataplane.libbpf` (verifier
log in the error), adopting at start a pinned program that is ours, current and attached,
attaching to the cluster interface (native XDP, else generic) and to the return groups'
interfaces, replacing a multihost program already attached there in one step (and refusing
anybody else's), pinning the program and its maps under the node's pin directory so they
outlive the agent, and detaching + unpinning: on a clean stop
(:meth:`XdpAttachment.remove`), or with no loaded data plane (:func:`cleanup`, for
``multihost cleanup`` and the nft backend's start).

:class:`XdpAttachment` is a base of :class:`multihost.dataplane.xdp.XdpDataplane`: it
declares the attributes its methods use, and ``XdpDataplane.__init__`` sets them.

Must not: decide what the tables hold (only a fresh program's node entry is written, through
:mod:`multihost.dataplane.xdpmaps`, before it is attached), detach a program that is not
multihost's, or touch any interface but the ones it is given (in the calling thread's
network namespace, or ``netns``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multihost.dataplane import libbpf
from multihost.dataplane.libbpf import BpfError, BpfObject
from multihost.dataplane.nft import netns_entered
from multihost.dataplane.ruleset import GroupBuckets
from multihost.dataplane.xdplayout import (
    CLOCK_PROGRAM_NAME,
    MAP_NAMES,
    NODE,
    PROGRAM_NAME,
    bucket_elements,
)
from multihost.dataplane.xdpmaps import XdpMaps, lease_held_now, pack
from multihost.dataplane.xdpobject import (
    BTF_PATH,
    XdpError,
    auto_modes,
    build_id,
    check_object,
    interface_driver,
    interface_mac,
    is_bpffs,
)


@dataclass(frozen=True)
class Attached:
    """Where the program runs: ``mode`` native or generic, kernel program id."""

    ifindex: int
    mode: str
    program_id: int
    adopted: bool  # found pinned and attached at start, kept


class XdpAttachment(XdpMaps):
    """Where the program runs and where it is pinned (see module docstring)."""

    interface: str
    pin_dir: Path
    netns: str | None
    mode: str
    obj_path: Path
    extra_interfaces: tuple[str, ...]
    extra_attached: dict[str, Attached]
    attached: Attached | None
    _state: dict[str, GroupBuckets] | None

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
        prog_fd = clock_fd = None
        try:
            prog_fd = libbpf.obj_get(str(prog_pin))
            pid = libbpf.prog_id(prog_fd)
            if libbpf.xdp_query_id(ifindex) != pid:
                raise XdpError("pinned program is not the one attached")
            clock_fd = libbpf.obj_get(str(self.pin_dir / "clock"))
            for name in MAP_NAMES:
                fds[name] = libbpf.obj_get(str(self.pin_dir / name))
            raw = libbpf.map_lookup(fds["mh_node"], pack("=I", 0), NODE.size)
            if raw is None or raw[16:48] != bytes.fromhex(build_id()):
                raise XdpError("pinned program was built from other sources")
            need = bucket_elements([self.spec.buckets] * len(self.spec.groups))
            if libbpf.map_max_entries(fds["mh_buckets"]) < need:
                raise XdpError("pinned bucket map is too small for this configuration")
            mode = (
                "native" if libbpf.xdp_query_id(ifindex, libbpf.XDP_FLAGS_DRV_MODE) else "generic"
            )
        except (BpfError, XdpError, OSError):
            for fd in (*fds.values(), prog_fd, clock_fd):
                if fd is not None:
                    os.close(fd)
            return None
        self._fds, self._prog_fd, self._clock_fd = fds, prog_fd, clock_fd
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
            clock_fd = os.dup(obj.program_fd(CLOCK_PROGRAM_NAME))
        except BpfError as e:  # an object without our maps or program
            raise XdpError(f"XDP object {self.obj_path} does not match this loader: {e}") from e
        finally:
            obj.close()
        self._fds, self._prog_fd, self._clock_fd = fds, prog_fd, clock_fd
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
        if self._clock_fd is not None:
            libbpf.obj_pin(self._clock_fd, str(self.pin_dir / "clock"))
        for name, fd in self._fds.items():
            libbpf.obj_pin(fd, str(self.pin_dir / name))


def _mode_flags(mode: str) -> int:
    return libbpf.XDP_FLAGS_DRV_MODE if mode == "native" else libbpf.XDP_FLAGS_SKB_MODE


def pinned_lease_held(pin_dir: Path) -> bool:
    """Whether the pinned program under ``pin_dir`` takes new flows now (for a node whose
    agent is gone: its lease lapses by itself)."""
    node_fd = libbpf.obj_get(str(pin_dir / "mh_node"))
    try:
        clock_fd = libbpf.obj_get(str(pin_dir / "clock"))
        try:
            return lease_held_now(node_fd, clock_fd)
        finally:
            os.close(clock_fd)
    finally:
        os.close(node_fd)


def unpin(pin_dir: Path) -> None:
    """Remove a pin directory's pins (and the directory); fine if it is absent."""
    if not pin_dir.is_dir():
        return
    for name in ("prog", "clock", *MAP_NAMES):
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
