"""A small typed ctypes binding to libbpf (Debian ``libbpf1``, 1.1): just what multihost uses.

Owns: loading ``libbpf.so.1``, the C signatures and structs of the calls below, turning
libbpf's negative-errno / NULL+errno returns into :class:`BpfError` with the call's name and
``strerror``, and the verifier log of a program that failed to load.

Calls: objects (``bpf_object__open_file``, ``__load``, ``__close``, ``__find_map_by_name``,
``__find_program_by_name``), maps (``bpf_map__fd``, ``__set_max_entries``, ``__reuse_fd``,
``bpf_map_update_elem``, ``_lookup_elem``, ``_delete_elem``, ``_get_next_key``), programs
(``bpf_program__fd``, ``__set_log_buf``, ``__set_log_level``, ``bpf_prog_test_run_opts``,
``bpf_prog_get_fd_by_id``), XDP (``bpf_xdp_attach``, ``bpf_xdp_detach``,
``bpf_xdp_query_id``), pinning (``bpf_obj_pin``, ``bpf_obj_get``) and
``bpf_obj_get_info_by_fd``.

Why ctypes over a binding: the maintained Python BPF bindings are BCC (compiles C on the node
at run time, which the project refuses) and pyroute2's (loads raw bytecode, no ELF/BTF/CO-RE
handling); libbpf is the kernel's own loader, already on every Debian node as ``libbpf1``,
and the ~15 calls here are stable ABI.

Must not: know about multihost's maps or packets (that is :mod:`multihost.dataplane.xdp`
and its parts, :mod:`~multihost.dataplane.xdpattach` and :mod:`~multihost.dataplane.xdpmaps`).
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
from typing import Any

_LIBBPF = "libbpf.so.1"
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_REPLACE = 1 << 4
BPF_ANY = 0
LOG_SIZE = 1 << 20


class BpfError(OSError):
    """A libbpf call failed: ``errno`` is the kernel's, the message names the call."""

    def __init__(self, call: str, err: int, detail: str = "") -> None:
        msg = f"{call}: {os.strerror(err)}" + (f": {detail}" if detail else "")
        super().__init__(err, msg)
        self.call = call
        self.detail = detail

    def __str__(self) -> str:
        return str(self.args[1])


class TestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class XdpAttachOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("old_prog_fd", ctypes.c_int)]


_vp, _int, _u32, _str, _sz = (
    ctypes.c_void_p,
    ctypes.c_int,
    ctypes.c_uint32,
    ctypes.c_char_p,
    ctypes.c_size_t,
)
_SIGNATURES: dict[str, tuple[list[Any], Any]] = {
    "libbpf_set_print": ([_vp], _vp),
    "bpf_object__open_file": ([_str, _vp], _vp),
    "bpf_object__load": ([_vp], _int),
    "bpf_object__close": ([_vp], None),
    "bpf_object__find_map_by_name": ([_vp, _str], _vp),
    "bpf_object__find_program_by_name": ([_vp, _str], _vp),
    "bpf_map__fd": ([_vp], _int),
    "bpf_map__set_max_entries": ([_vp, _u32], _int),
    "bpf_map__reuse_fd": ([_vp, _int], _int),
    "bpf_program__fd": ([_vp], _int),
    "bpf_program__set_log_buf": ([_vp, _vp, _sz], _int),
    "bpf_program__set_log_level": ([_vp, _u32], _int),
    "bpf_map_update_elem": ([_int, _vp, _vp, ctypes.c_uint64], _int),
    "bpf_map_lookup_elem": ([_int, _vp, _vp], _int),
    "bpf_map_delete_elem": ([_int, _vp], _int),
    "bpf_map_get_next_key": ([_int, _vp, _vp], _int),
    "bpf_prog_test_run_opts": ([_int, ctypes.POINTER(TestRunOpts)], _int),
    "bpf_prog_get_fd_by_id": ([_u32], _int),
    "bpf_xdp_attach": ([_int, _int, _u32, ctypes.POINTER(XdpAttachOpts)], _int),
    "bpf_xdp_detach": ([_int, _u32, _vp], _int),
    "bpf_xdp_query_id": ([_int, _int, ctypes.POINTER(_u32)], _int),
    "bpf_obj_pin": ([_int, _str], _int),
    "bpf_obj_get": ([_str], _int),
    "bpf_obj_get_info_by_fd": ([_int, _vp, ctypes.POINTER(_u32)], _int),
}


@functools.cache
def lib() -> ctypes.CDLL:
    """libbpf with the signatures above; its own printing to stderr silenced."""
    try:
        handle = ctypes.CDLL(_LIBBPF, use_errno=True)
    except OSError as e:
        raise BpfError("dlopen", 2, f"cannot load {_LIBBPF} (Debian: libbpf1): {e}") from e
    for name, (args, result) in _SIGNATURES.items():
        func = getattr(handle, name)
        func.argtypes, func.restype = args, result
    handle.libbpf_set_print(None)  # errors come back as BpfError with the verifier log
    return handle


def check(call: str, rc: int, detail: str = "") -> int:
    """``rc`` if >= 0, else raise :class:`BpfError` (libbpf returns ``-errno``)."""
    if rc < 0:
        raise BpfError(call, -rc, detail)
    return rc


def _ptr(call: str, p: int | None, detail: str = "") -> int:
    if not p:
        raise BpfError(call, ctypes.get_errno() or 2, detail)
    return p


def _buf(data: bytes | bytearray) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(bytes(data), len(data))


class BpfObject:
    """An opened (then loaded) ELF object; :meth:`close` frees what the kernel does not pin."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._obj: int | None = _ptr(
            "bpf_object__open_file", lib().bpf_object__open_file(path.encode(), None), path
        )
        self._logs: dict[str, ctypes.Array[ctypes.c_char]] = {}

    @property
    def handle(self) -> int:
        if self._obj is None:
            raise BpfError("bpf_object", 9, "object is closed")
        return self._obj

    def map(self, name: str) -> int:
        return _ptr(
            "bpf_object__find_map_by_name",
            lib().bpf_object__find_map_by_name(self.handle, name.encode()),
            name,
        )

    def program(self, name: str) -> int:
        return _ptr(
            "bpf_object__find_program_by_name",
            lib().bpf_object__find_program_by_name(self.handle, name.encode()),
            name,
        )

    def set_max_entries(self, map_name: str, entries: int) -> None:
        check(
            "bpf_map__set_max_entries", lib().bpf_map__set_max_entries(self.map(map_name), entries)
        )

    def reuse_map_fd(self, map_name: str, fd: int) -> None:
        check("bpf_map__reuse_fd", lib().bpf_map__reuse_fd(self.map(map_name), fd), map_name)

    def capture_log(self, program: str) -> None:
        """Keep the verifier's log of ``program`` (read by :meth:`log` after a failure)."""
        buf = ctypes.create_string_buffer(LOG_SIZE)
        self._logs[program] = buf
        prog = self.program(program)
        check("bpf_program__set_log_buf", lib().bpf_program__set_log_buf(prog, buf, LOG_SIZE))
        check("bpf_program__set_log_level", lib().bpf_program__set_log_level(prog, 1))

    def log(self, program: str) -> str:
        buf = self._logs.get(program)
        return buf.value.decode(errors="replace") if buf is not None else ""

    def load(self) -> None:
        rc = lib().bpf_object__load(self.handle)
        if rc < 0:
            logs = "; ".join(tail(v.value.decode(errors="replace")) for v in self._logs.values())
            check("bpf_object__load", rc, logs or self.path)

    def map_fd(self, name: str) -> int:
        return check("bpf_map__fd", lib().bpf_map__fd(self.map(name)), name)

    def program_fd(self, name: str) -> int:
        return check("bpf_program__fd", lib().bpf_program__fd(self.program(name)), name)

    def close(self) -> None:
        """Free the object: its fds close (pinned or attached objects stay in the kernel)."""
        if self._obj is not None:
            lib().bpf_object__close(self._obj)
            self._obj = None


def tail(log: str, lines: int = 6) -> str:
    """The last lines of a verifier log (where the reason is)."""
    rows = [r for r in log.strip().splitlines() if r.strip()]
    return " | ".join(rows[-lines:])


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    check("bpf_map_update_elem", lib().bpf_map_update_elem(fd, _buf(key), _buf(value), flags))


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    out = ctypes.create_string_buffer(value_size)
    rc = lib().bpf_map_lookup_elem(fd, _buf(key), out)
    if rc < 0:
        if -rc == 2 or ctypes.get_errno() == 2:  # ENOENT
            return None
        check("bpf_map_lookup_elem", rc)
    return out.raw


def map_delete(fd: int, key: bytes) -> bool:
    rc = lib().bpf_map_delete_elem(fd, _buf(key))
    if rc < 0 and -rc != 2:
        check("bpf_map_delete_elem", rc)
    return bool(rc == 0)


def map_keys(fd: int, key_size: int) -> list[bytes]:
    """Every key of a hash map (``bpf_map_get_next_key`` walk)."""
    keys: list[bytes] = []
    cur: ctypes.Array[ctypes.c_char] | None = None
    nxt = ctypes.create_string_buffer(key_size)
    while lib().bpf_map_get_next_key(fd, cur, nxt) == 0:
        keys.append(nxt.raw)
        cur = ctypes.create_string_buffer(nxt.raw, key_size)
    return keys


def obj_pin(fd: int, path: str) -> None:
    check("bpf_obj_pin", lib().bpf_obj_pin(fd, path.encode()), path)


def obj_get(path: str) -> int:
    return check("bpf_obj_get", lib().bpf_obj_get(path.encode()), path)


def obj_info(fd: int, size: int = 256) -> bytes:
    """``struct bpf_prog_info`` / ``bpf_map_info`` bytes (callers unpack what they need)."""
    buf = ctypes.create_string_buffer(size)
    n = ctypes.c_uint32(size)
    check("bpf_obj_get_info_by_fd", lib().bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(n)))
    return buf.raw[: n.value]


def prog_id(fd: int) -> int:
    """The kernel id of a program fd (``bpf_prog_info.id``, offset 4)."""
    return int.from_bytes(obj_info(fd)[4:8], "little")


def map_max_entries(fd: int) -> int:
    """``bpf_map_info.max_entries`` (offset 16)."""
    return int.from_bytes(obj_info(fd)[16:20], "little")


def prog_fd_by_id(prog: int) -> int:
    return check("bpf_prog_get_fd_by_id", lib().bpf_prog_get_fd_by_id(prog), str(prog))


def xdp_attach(ifindex: int, prog_fd: int, flags: int, old_prog_fd: int | None = None) -> None:
    opts = XdpAttachOpts(ctypes.sizeof(XdpAttachOpts), old_prog_fd if old_prog_fd else 0)
    if old_prog_fd:
        flags |= XDP_FLAGS_REPLACE
    check("bpf_xdp_attach", lib().bpf_xdp_attach(ifindex, prog_fd, flags, ctypes.byref(opts)))


def xdp_detach(ifindex: int, flags: int = 0) -> None:
    check("bpf_xdp_detach", lib().bpf_xdp_detach(ifindex, flags, None))


def xdp_query_id(ifindex: int, flags: int = 0) -> int:
    """Id of the XDP program attached in ``flags``' mode (0: any mode), 0 if none."""
    out = ctypes.c_uint32(0)
    check("bpf_xdp_query_id", lib().bpf_xdp_query_id(ifindex, flags, ctypes.byref(out)))
    return out.value


def test_run(
    prog_fd: int, data: bytes, *, repeat: int = 1, out_size: int = 2048, ingress_ifindex: int = 0
) -> tuple[int, bytes, int]:
    """``BPF_PROG_RUN``: (return value, output packet, ns per run).  ``ingress_ifindex``:
    the frame arrives on that interface (``xdp_md.ingress_ifindex``; default loopback)."""
    inp = _buf(data)
    out = ctypes.create_string_buffer(out_size)
    opts = TestRunOpts()
    opts.sz = ctypes.sizeof(TestRunOpts)
    opts.data_in = ctypes.cast(inp, ctypes.c_void_p)
    opts.data_size_in = len(data)
    opts.data_out = ctypes.cast(out, ctypes.c_void_p)
    opts.data_size_out = out_size
    opts.repeat = repeat
    if ingress_ifindex:  # struct xdp_md: data, data_end, data_meta, ingress_ifindex, ...
        ctx = ctypes.create_string_buffer(
            struct.pack("=6I", 0, len(data), 0, ingress_ifindex, 0, 0)
        )
        opts.ctx_in = ctypes.cast(ctx, ctypes.c_void_p)
        opts.ctx_size_in = 24
    check("bpf_prog_test_run_opts", lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)))
    return opts.retval, out.raw[: opts.data_size_out], opts.duration
