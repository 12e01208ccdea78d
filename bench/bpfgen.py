"""A tiny raw-bytecode eBPF loader and an XDP "live frames" packet generator (bench only).

Owns: the ``bpf(2)`` syscall through ctypes (array maps, program load, ``BPF_PROG_RUN``), a
hand-assembled XDP program that stamps one flow per frame from an array map into a template
Ethernet/IPv4/UDP frame, and running it with ``BPF_F_TEST_XDP_LIVE_FRAMES`` (kernel >= 5.18,
``Documentation/bpf/bpf_prog_run.rst``).

How live frames are used: ``BPF_PROG_RUN`` with the flag runs the program ``repeat`` times,
each on a fresh page-pool copy of the template frame, in batches (default 64) with bottom
halves disabled; the verdict is *executed*: ``XDP_TX`` becomes a redirect out of the
``ingress_ifindex`` given in the ``xdp_md`` context (a veth, so the frame lands in its peer's
NAPI ring), ``XDP_DROP`` just recycles the page.  After each batch the redirect queue is
flushed and ``local_bh_enable`` runs the pending NET_RX softirq on the same CPU, so the peer's
whole receive path (veth poll, skb build, GRO, IP, netfilter, UDP) runs synchronously inside
the calling thread.  The ifindex is resolved in the calling *thread's* network namespace.
With ``repeat > 1`` the kernel swaps the XDP dispatcher in and out around the run (about
25 ms asleep per call here), so per-call wall time is no measure of packet rate; the
returned ``duration`` (the kernel's clock of its run loop, per frame) and the thread's CPU
time are.

The program (``flow_program``)::

    i = counter[0]++ ; f = flows[i & mask]          # two array-map lookups
    frame.ip.saddr = f.saddr ; frame.ip.check = f.ipsum ; frame.udp.source = f.sport
    return ACTION                                   # XDP_TX (send) or XDP_DROP (calibrate)

A flow entry is 8 bytes, stored exactly as the frame carries them: source address, IPv4
header checksum (precomputed for that address), UDP source port.  The UDP checksum is 0
(allowed for IPv4), so nothing else changes per flow.

Must not: attach programs to devices, pin objects, or touch any namespace; file descriptors
it returns belong to the caller, who closes them (:func:`close`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

_SYS_BPF = 321  # x86_64
BPF_MAP_CREATE, BPF_MAP_UPDATE_ELEM, BPF_PROG_LOAD, BPF_PROG_RUN = 0, 2, 5, 10
BPF_LINK_CREATE = 28
BPF_ENABLE_STATS, BPF_STATS_RUN_TIME = 32, 0
BPF_XDP = 37  # attach type
XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE = 1 << 1, 1 << 2
BPF_MAP_TYPE_ARRAY = 2
BPF_PROG_TYPE_XDP = 6
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
BPF_PSEUDO_MAP_FD = 1
XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX = 0, 1, 2, 3
FUNC_MAP_LOOKUP_ELEM = 1
FUNC_REDIRECT = 23  # bpf_redirect(ifindex, flags): XDP_REDIRECT out of that device
FLOW_ENTRY = struct.Struct("=4s2s2s")  # saddr, IPv4 header checksum, sport: wire bytes

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """The bpf(2) syscall failed (errno and, for program loads, the verifier log)."""


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    rc = int(_libc.syscall(_SYS_BPF, cmd, attr, len(attr)))
    if rc < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf(cmd={cmd}): {os.strerror(err)}")
    return rc


def _attr(size: int, *fields: tuple[str, int, int]) -> ctypes.Array[ctypes.c_char]:
    buf = ctypes.create_string_buffer(size)
    for fmt, offset, value in fields:
        struct.pack_into(fmt, buf, offset, value)
    return buf


def _addr(obj: ctypes.Array[ctypes.c_char] | ctypes.Array[ctypes.c_ubyte]) -> int:
    return ctypes.addressof(obj)


def map_create(key_size: int, value_size: int, max_entries: int) -> int:
    """A BPF_MAP_TYPE_ARRAY map; returns its fd."""
    return _bpf(
        BPF_MAP_CREATE,
        _attr(
            72,
            ("=I", 0, BPF_MAP_TYPE_ARRAY),
            ("=I", 4, key_size),
            ("=I", 8, value_size),
            ("=I", 12, max_entries),
        ),
    )


def map_update(fd: int, key: bytes, value: bytes) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    attr = _attr(32, ("=I", 0, fd), ("=Q", 8, _addr(k)), ("=Q", 16, _addr(v)), ("=Q", 24, 0))
    _bpf(BPF_MAP_UPDATE_ELEM, attr)


# --- a minimal assembler -------------------------------------------------------------------


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _mov_imm(dst: int, imm: int) -> bytes:
    return _insn(0xB7, dst, imm=imm)


def _mov_reg(dst: int, src: int) -> bytes:
    return _insn(0xBF, dst, src)


def _add_imm(dst: int, imm: int) -> bytes:
    return _insn(0x07, dst, imm=imm)


def _and_imm(dst: int, imm: int) -> bytes:
    return _insn(0x57, dst, imm=imm)


_SIZE = {4: 0x00, 2: 0x08, 1: 0x10, 8: 0x18}


def _ldx(size: int, dst: int, src: int, off: int) -> bytes:
    return _insn(0x61 | _SIZE[size], dst, src, off)


def _stx(size: int, dst: int, off: int, src: int) -> bytes:
    return _insn(0x63 | _SIZE[size], dst, src, off)


def _st_imm(size: int, dst: int, off: int, imm: int) -> bytes:
    return _insn(0x62 | _SIZE[size], dst, off=off, imm=imm)


def _ld_map(dst: int, fd: int) -> bytes:
    return _insn(0x18, dst, BPF_PSEUDO_MAP_FD, imm=fd) + _insn(0)


@dataclass(frozen=True)
class _Jump:
    """A conditional jump to the ``drop`` block, encoded once its position is known."""

    code: int
    dst: int
    src: int = 0
    imm: int = 0

    def encode(self, offset: int) -> bytes:
        return _insn(self.code, self.dst, self.src, offset, self.imm)


def _jeq_imm_drop(dst: int, imm: int) -> _Jump:
    return _Jump(0x15, dst, imm=imm)


def _jgt_reg_drop(dst: int, src: int) -> _Jump:
    return _Jump(0x2D, dst, src)


def _call(helper: int) -> bytes:
    return _insn(0x85, imm=helper)


_EXIT = _insn(0x95)
# Frame offsets (Ethernet 14 + IPv4 20 + UDP 8).
OFF_IP_CSUM, OFF_IP_SADDR, OFF_UDP_SPORT, MIN_FRAME = 24, 26, 34, 42


def flow_program(counter_fd: int, flows_fd: int, mask: int, action: int) -> bytes:
    """The generator's instructions (see the module docstring); errors return XDP_ABORTED."""
    body: list[bytes | _Jump] = [
        _mov_reg(6, 1),  # r6 = ctx
        _st_imm(4, 10, -4, 0),  # key 0
        _ld_map(1, counter_fd),
        _mov_reg(2, 10),
        _add_imm(2, -4),
        _call(FUNC_MAP_LOOKUP_ELEM),
        _jeq_imm_drop(0, 0),
        _ldx(4, 7, 0, 0),  # r7 = counter
        _mov_reg(8, 7),
        _add_imm(8, 1),
        _stx(4, 0, 0, 8),  # counter += 1
        _and_imm(7, mask),
        _stx(4, 10, -8, 7),
        _ld_map(1, flows_fd),
        _mov_reg(2, 10),
        _add_imm(2, -8),
        _call(FUNC_MAP_LOOKUP_ELEM),
        _jeq_imm_drop(0, 0),
        _ldx(4, 2, 6, 0),  # r2 = ctx->data
        _ldx(4, 3, 6, 4),  # r3 = ctx->data_end
        _mov_reg(4, 2),
        _add_imm(4, MIN_FRAME),
        _jgt_reg_drop(4, 3),
        _ldx(4, 5, 0, 0),
        _stx(4, 2, OFF_IP_SADDR, 5),
        _ldx(2, 5, 0, 4),
        _stx(2, 2, OFF_IP_CSUM, 5),
        _ldx(2, 5, 0, 6),
        _stx(2, 2, OFF_UDP_SPORT, 5),
        _mov_imm(0, action),
        _EXIT,
    ]
    return _link(body, [_mov_imm(0, XDP_ABORTED), _EXIT])


def _link(body: Sequence[bytes | _Jump], drop: Sequence[bytes]) -> bytes:
    """Concatenate ``body`` then ``drop``; every :class:`_Jump` lands on ``drop``."""
    sizes = [1 if isinstance(b, _Jump) else len(b) // 8 for b in body]
    target = sum(sizes)
    out: list[bytes] = []
    pc = 0
    for item, size in zip(body, sizes, strict=True):
        out.append(item.encode(target - pc - 1) if isinstance(item, _Jump) else item)
        pc += size
    return b"".join(out) + b"".join(drop)


def load_flow_program(counter_fd: int, flows_fd: int, mask: int, action: int) -> int:
    """Load :func:`flow_program` as an XDP program; returns its fd."""
    return _prog_load(flow_program(counter_fd, flows_fd, mask, action))


def load_action_program(action: int) -> int:
    """The XDP floor: a program that only returns ``action`` (2 = XDP_PASS, 1 = XDP_DROP)."""
    return _prog_load(_mov_imm(0, action) + _EXIT, b"mhtB_floor")


def load_redirect_program(ifindex: int) -> int:
    """A one-port XDP "wire": every frame is redirected out of ``ifindex`` (a veth, so it
    reaches the veth's peer as an ``xdp_frame``, as a NIC's frames reach its driver)."""
    insns = _mov_imm(1, ifindex) + _mov_imm(2, 0) + _call(FUNC_REDIRECT) + _EXIT
    return _prog_load(insns, b"mhtB_wire")


def xdp_link(prog_fd: int, ifindex: int, native: bool = True) -> int:
    """Attach ``prog_fd`` to ``ifindex`` (of the calling thread's namespace) through a BPF
    link; closing the returned fd detaches it."""
    flags = XDP_FLAGS_DRV_MODE if native else XDP_FLAGS_SKB_MODE
    attr = _attr(64, ("=I", 0, prog_fd), ("=I", 4, ifindex), ("=I", 8, BPF_XDP), ("=I", 12, flags))
    return _bpf(BPF_LINK_CREATE, attr)


def enable_run_time_stats() -> int:
    """``BPF_ENABLE_STATS``: every program's ``run_time_ns`` / ``run_cnt`` are kept while the
    returned fd is open (closing it ends that; nothing else to restore)."""
    return _bpf(BPF_ENABLE_STATS, _attr(8, ("=I", 0, BPF_STATS_RUN_TIME)))


def _prog_load(insns: bytes, name: bytes = b"mhtB_gen") -> int:
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(65536)
    attr = _attr(
        128,
        ("=I", 0, BPF_PROG_TYPE_XDP),
        ("=I", 4, len(insns) // 8),
        ("=Q", 8, _addr(code)),
        ("=Q", 16, _addr(lic)),
        ("=I", 24, 1),
        ("=I", 28, len(log)),
        ("=Q", 32, _addr(log)),
    )
    struct.pack_into("16s", attr, 48, name)
    try:
        return _bpf(BPF_PROG_LOAD, attr)
    except BpfError as e:
        text = log.value.decode(errors="replace")
        raise BpfError(e.errno, f"{e.strerror}; verifier log:\n{text}") from None


@dataclass
class RunResult:
    """One BPF_PROG_RUN: the kernel's average ns per repetition and the return value."""

    duration_ns: int
    retval: int


def prog_run_live(
    prog_fd: int, frame: bytes, ifindex: int, repeat: int, batch_size: int = 0
) -> RunResult:
    """Run ``prog_fd`` ``repeat`` times on ``frame`` in live-frames mode, ``ifindex`` as the
    ingress device (resolved in the calling thread's network namespace)."""
    data = ctypes.create_string_buffer(frame, len(frame))
    ctx = ctypes.create_string_buffer(struct.pack("=6I", 0, len(frame), 0, ifindex, 0, 0), 24)
    attr = _attr(
        80,
        ("=I", 0, prog_fd),
        ("=I", 8, len(frame)),
        ("=Q", 16, _addr(data)),
        ("=I", 32, repeat),
        ("=I", 40, len(ctx)),
        ("=Q", 48, _addr(ctx)),
        ("=I", 64, BPF_F_TEST_XDP_LIVE_FRAMES),
        ("=I", 72, batch_size),
    )
    _bpf(BPF_PROG_RUN, attr)
    retval, duration = struct.unpack_from("=I", attr, 4)[0], struct.unpack_from("=I", attr, 36)[0]
    return RunResult(duration_ns=int(duration), retval=int(retval))


def close(fd: int) -> None:
    os.close(fd)
