"""The compiled XDP object, and whether this machine and an interface can run it.

Owns: where ``bpf/multihost_xdp.o`` and the sources it is built from live; the build id an
object must carry (sha256 of the layout header, then the source) and checking it (missing or
stale -> :class:`XdpError` that says to run ``make setup``); the probe without loading of
whether this machine can run the XDP backend at all (libbpf, kernel BTF, the object, root);
whether a directory is on a BPF filesystem; and what the loader needs to know about an
interface (its MAC, its driver, and so the attach modes ``auto`` tries).  :class:`XdpError`
is the one error of the XDP backend.

Must not: load, attach, pin or detach a program, or touch a BPF map (that is
:mod:`multihost.dataplane.xdpattach` and :mod:`multihost.dataplane.xdpmaps`); it only reads
files and asks the kernel about interfaces.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import struct
from pathlib import Path

from multihost.dataplane import libbpf
from multihost.dataplane.libbpf import BpfError

BPF_DIR = Path(__file__).resolve().parent / "bpf"
SOURCE = BPF_DIR / "multihost_xdp.c"
HEADER = BPF_DIR / "multihost_layout.h"
OBJECT = BPF_DIR / "multihost_xdp.o"
BPF_FS_MAGIC = 0xCAFE4A11
BTF_PATH = Path("/sys/kernel/btf/vmlinux")
_SIOCGIFHWADDR = 0x8927


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
