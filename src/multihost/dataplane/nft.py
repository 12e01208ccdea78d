"""Thin shell over the kernel's nftables: a ctypes binding to ``libnftables.so.1`` and the
:class:`Dataplane` that applies the scripts :mod:`multihost.dataplane.ruleset` renders.

Owns: the persistent libnftables context (:class:`Nft`) whose netlink socket *owns* the
``flags owner`` table, so the kernel deletes that table when the process dies (fail-closed)
and no other process may change it; entering a network namespace for that socket; the
applied bucket state and the delta bookkeeping of :meth:`Dataplane.update`; reading
counters and set contents back from the kernel.

Must not: build nft syntax itself (everything it sends comes from ``ruleset``), touch links
or addresses (that is ``hostsetup``), or spawn the ``nft`` binary.

Element updates (:meth:`Dataplane.update`) take a fast path: the delta is encoded as one
nf_tables netlink batch (``NFT_MSG_DELSETELEM``/``NFT_MSG_NEWSETELEM`` between batch
begin/end, ``NLM_F_ACK`` on every message) and sent on the context's *own* netlink socket,
found as the one ``NETLINK_NETFILTER`` descriptor ``nft_ctx_new`` opened, used through a
``dup`` (only ownership by that socket lets us touch the owned table).  libnftables needs
~1.3 us per element to parse and evaluate, the kernel ~0.6 us: 6,720 elements take ~5-7 ms
this way against ~13-25 ms through libnftables JSON and ~20-35 ms as text (the text form is
still what :meth:`Dataplane.install` sends).  Any doubt (no unique socket, ``EPERM``) falls
back to libnftables JSON.

C API used (``include/nftables/libnftables.h``, libnftables 1.0.x): ``nft_ctx_new``,
``nft_ctx_free``, ``nft_ctx_buffer_output``, ``nft_ctx_buffer_error``,
``nft_ctx_get_output_buffer``, ``nft_ctx_get_error_buffer``, ``nft_ctx_output_get_flags``,
``nft_ctx_output_set_flags`` and ``nft_run_cmd_from_buffer``.  ``nft_ctx_new`` opens the
netlink socket immediately, so the namespace current at construction is the one the context
manages for its whole life.  Do not ``fork()`` without ``exec`` while holding an :class:`Nft`:
the child would keep the socket, and with it the owned table, alive.

libnftables 1.0.6 quirk: ``list tables`` / ``list ruleset`` in JSON print garbage (or cut the
output) for the ``flags`` of an owner table; this module only lists sets and counters.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import functools
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from multihost.dataplane.ruleset import (
    Delta,
    GroupBuckets,
    RulesetSpec,
    check_state,
    counter_names,
    delta_of_checked,
    render_delta_json,
    render_install,
    render_remove,
    set_names,
)

NFT_CTX_DEFAULT = 0
NFT_CTX_OUTPUT_JSON = 1 << 4
NFT_CTX_OUTPUT_NUMERIC_ALL = (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10)
_CLONE_NEWNET = 0x40000000
_LIBNFTABLES = "libnftables.so.1"


class NftError(RuntimeError):
    """libnftables (or the kernel) refused a command; the message carries its error text."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code  # errno from the kernel, when known


class NetnsError(OSError):
    """A network namespace could not be entered or left."""


_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"setns: {os.strerror(err)}")


def netns_path(netns: str) -> str:
    """``ip netns`` name (``/run/netns/NAME``) or an explicit path such as ``/proc/1/ns/net``."""
    return netns if "/" in netns else f"/run/netns/{netns}"


@contextmanager
def netns_entered(netns: str | None) -> Iterator[None]:
    """Run the body with the *calling thread* in ``netns`` (None: stay where it is).

    Sockets created inside keep that namespace for their life; ``/proc/sys/net`` opened inside
    shows that namespace's values.
    """
    if netns is None:
        yield
        return
    target = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(home)
    finally:
        os.close(target)


_vp, _int, _uint, _str = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_char_p
_SIGNATURES: dict[str, tuple[list[Any], Any]] = {
    "nft_ctx_new": ([ctypes.c_uint32], _vp),
    "nft_ctx_free": ([_vp], None),
    "nft_ctx_buffer_output": ([_vp], _int),
    "nft_ctx_buffer_error": ([_vp], _int),
    "nft_ctx_get_output_buffer": ([_vp], _str),
    "nft_ctx_get_error_buffer": ([_vp], _str),
    "nft_ctx_output_get_flags": ([_vp], _uint),
    "nft_ctx_output_set_flags": ([_vp, _uint], None),
    "nft_run_cmd_from_buffer": ([_vp, _str], _int),
}


@functools.cache
def _load() -> ctypes.CDLL:
    """libnftables with the C signatures of the functions this module calls."""
    try:
        lib = ctypes.CDLL(_LIBNFTABLES, use_errno=True)
    except OSError as e:
        raise NftError(f"cannot load {_LIBNFTABLES} (Debian: libnftables1): {e}") from e
    for name, (args, result) in _SIGNATURES.items():
        func = getattr(lib, name)
        func.argtypes, func.restype = args, result
    return lib


NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
NFPROTO_INET = 1
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
_SO_SNDBUFFORCE = 32
_NLMSG = struct.Struct("=IHHII")
_CHUNK = 2048  # elements per message: the ELEMENTS nest length is 16 bits (16 bytes each)
# NFTA_LIST_ELEM { NFTA_SET_ELEM_KEY { NFTA_DATA_VALUE: u32 in host order } }
_ELEM = np.dtype([("hdr", "=u2", (6,)), ("value", "=u4")])
_ELEM_HDR = np.array([16, 1 | NLA_F_NESTED, 12, 1 | NLA_F_NESTED, 8, 1], dtype="=u2")
_ctx_lock = threading.Lock()


def _nlattr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + bytes(-size % 4)


def _nlmsg(
    kind: int, flags: int, seq: int, body: bytes, *, family: int = 0, res_id: int = 0
) -> bytes:
    payload = struct.pack("=BBH", family, 0, socket.htons(res_id)) + body
    return _NLMSG.pack(_NLMSG.size + len(payload), kind, flags, seq, 0) + payload


def encode_element_batch(table: str, delta: Delta, seq: int) -> tuple[bytes, list[int]]:
    """One nf_tables batch applying ``delta`` to inet ``table``; the sequence numbers to ack."""
    begin = _nlmsg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, b"", res_id=NFNL_SUBSYS_NFTABLES)
    parts, acks = [begin], []
    for verb, changes in ((NFT_MSG_DELSETELEM, delta.removed), (NFT_MSG_NEWSETELEM, delta.added)):
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if verb == NFT_MSG_NEWSETELEM else 0)
        for name, values in changes.items():
            keys = np.fromiter(values, dtype=np.uint32, count=len(values))
            for i in range(0, len(keys), _CHUNK):
                recs = np.empty(len(keys[i : i + _CHUNK]), dtype=_ELEM)
                recs["hdr"] = _ELEM_HDR
                recs["value"] = keys[i : i + _CHUNK]
                body = (
                    _nlattr(1, table.encode() + b"\0")
                    + _nlattr(2, name.encode() + b"\0")
                    + _nlattr(3 | NLA_F_NESTED, recs.tobytes())
                )
                seq += 1
                kind = (NFNL_SUBSYS_NFTABLES << 8) | verb
                parts.append(_nlmsg(kind, flags, seq, body, family=NFPROTO_INET))
                acks.append(seq)
    seq += 1
    parts.append(_nlmsg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, b"", res_id=NFNL_SUBSYS_NFTABLES))
    return b"".join(parts), acks


def _open_sockets() -> set[tuple[int, str]]:
    """(fd, ``socket:[inode]``) of this process's sockets (fd numbers alone get reused)."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # closed meanwhile (e.g. the directory handle of listdir itself)
        if target.startswith("socket:"):
            out.add((int(name), target))
    return out


def _netfilter_socket(candidates: set[tuple[int, str]]) -> socket.socket | None:
    """A dup of the single NETLINK_NETFILTER socket among ``candidates`` (None if not one)."""
    found: list[tuple[int, socket.socket]] = []
    for fd, _ in sorted(candidates):
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        if sock.family == socket.AF_NETLINK and sock.proto == NETLINK_NETFILTER:
            found.append((fd, sock))
        else:
            sock.close()
    if len(found) != 1:
        for _, sock in found:
            sock.close()
        return None
    fd, sock = found[0]
    # libnftables opens it without close-on-exec; a child must not keep the owned table alive
    fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
    return sock


class Nft:
    """A persistent libnftables context: one netlink socket for the life of the object.

    Tables created with ``flags owner`` through it belong to its socket: other processes
    cannot change them, and the kernel deletes them when :meth:`close` is called or the
    process dies.  Calls are serialised by a lock (a context is not thread-safe).
    """

    def __init__(self, netns: str | None = None) -> None:
        self._lib = _load()
        self._lock = threading.Lock()
        self.netns = netns
        with _ctx_lock, netns_entered(netns):
            before = _open_sockets()
            ctx = self._lib.nft_ctx_new(NFT_CTX_DEFAULT)
            opened = _open_sockets() - before
        if not ctx:
            raise NftError("nft_ctx_new failed")
        self._ctx: int | None = ctx
        self._nl = _netfilter_socket(opened)
        self._seq = 0x4D480000
        if self._lib.nft_ctx_buffer_output(ctx) != 0 or self._lib.nft_ctx_buffer_error(ctx) != 0:
            self.close()
            raise NftError("cannot buffer libnftables output")
        self._base_flags = int(self._lib.nft_ctx_output_get_flags(ctx))

    @property
    def closed(self) -> bool:
        return self._ctx is None

    def run(self, script: str, *, json_mode: bool = False) -> str:
        """Run an nft script (one atomic transaction) and return its output text.

        ``json_mode``: the script may be libnftables JSON and the output is JSON.  Raises
        :class:`NftError` with libnftables' error text when the script is refused; nothing
        of a refused script is applied.
        """
        with self._lock:
            ctx = self._ctx
            if ctx is None:
                raise NftError("the nft context is closed")
            flags = self._base_flags | (NFT_CTX_OUTPUT_JSON if json_mode else 0)
            self._lib.nft_ctx_output_set_flags(ctx, flags)
            with netns_entered(self.netns):
                rc = self._lib.nft_run_cmd_from_buffer(ctx, script.encode())
            out = (self._lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
            err = (self._lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
        if rc != 0:
            first = script if len(script) <= 200 else script[:200] + "..."
            raise NftError(f"nft failed (rc={rc}): {err.strip() or 'no error text'}\n{first}")
        return out

    def run_json(self, command: str) -> list[dict[str, Any]]:
        """Run a ``list ...`` command with JSON output; the ``nftables`` array, metainfo removed."""
        text = self.run(command, json_mode=True)
        if not text.strip():
            return []
        doc = json.loads(text)
        items: list[dict[str, Any]] = doc.get("nftables", [])
        return [i for i in items if "metainfo" not in i]

    @property
    def can_send_elements(self) -> bool:
        """Whether :meth:`send_elements` has the context's netlink socket."""
        return self._nl is not None

    def send_elements(self, table: str, delta: Delta) -> None:
        """Apply ``delta`` to inet ``table`` as one netlink batch on the context's socket.

        Atomic like :meth:`run`: on any error the kernel applies nothing and this raises
        :class:`NftError` whose ``code`` is the kernel's errno.
        """
        with self._lock:
            sock = self._nl
            if self._ctx is None or sock is None:
                raise NftError("no netlink socket of a live nft context")
            data, acks = encode_element_batch(table, delta, self._seq)
            self._seq += len(acks) + 2
            if len(data) > sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2:
                sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, 2 * len(data))
            try:
                sock.send(data)  # nfnetlink runs the batch and queues every ack before returning
            except OSError as e:
                raise NftError(f"netlink send: {e}", e.errno) from e
            pending, failed = set(acks), []
            while True:  # the socket is non-blocking (libnftables set O_NONBLOCK)
                try:
                    buf = sock.recv(1 << 20)
                except BlockingIOError:
                    break
                except OSError as e:  # e.g. ENOBUFS: replies were lost, the outcome is unknown
                    raise NftError(f"netlink receive: {e}", e.errno) from e
                off = 0
                while off + _NLMSG.size <= len(buf):
                    size, kind, _, seq, _ = _NLMSG.unpack_from(buf, off)
                    if kind == NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", buf, off + _NLMSG.size)
                        pending.discard(seq)
                        if code:
                            failed.append(-code)
                    off += max((size + 3) & ~3, _NLMSG.size)
        if failed:
            code = failed[0]
            raise NftError(f"kernel refused the element batch: {os.strerror(code)}", code)
        if pending:
            raise NftError(f"netlink: {len(pending)} of {len(acks)} acknowledgements missing")

    def close(self) -> None:
        """Free the context; tables it owns disappear with its socket.  Idempotent."""
        with self._lock:
            if self._nl is not None:
                self._nl.close()  # our dup would otherwise keep the socket (and table) alive
                self._nl = None
            if self._ctx is not None:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None

    def __enter__(self) -> Nft:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class UpdateStats:
    """What one :meth:`Dataplane.update` did and how long it took."""

    added: int
    removed: int
    render_seconds: float
    apply_seconds: float
    path: str = "none"  # "netlink", "json" or "none" (nothing to do)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)

    @property
    def seconds(self) -> float:
        return self.render_seconds + self.apply_seconds


class Dataplane:
    """The node's nft state: the guard table and the owned table, kept in step with ``state``.

    ``state`` maps each group name of the spec to its :class:`GroupBuckets`; groups left out
    own nothing.  The process that holds this object (its :class:`Nft`) owns the table.
    ``fast_path=False`` sends element updates through libnftables JSON instead of netlink.
    """

    def __init__(
        self, spec: RulesetSpec, nft: Nft | None = None, *, fast_path: bool = True
    ) -> None:
        spec.check()
        self.spec = spec
        self.fast_path = fast_path  # element updates as raw netlink (else libnftables JSON)
        self._own_nft = nft is None
        self.nft = nft if nft is not None else Nft()
        self._state: dict[str, GroupBuckets] | None = None

    @property
    def state(self) -> dict[str, GroupBuckets] | None:
        """The bucket state last applied (None before :meth:`install`)."""
        return None if self._state is None else dict(self._state)

    def install(self, state: Mapping[str, GroupBuckets], spec: RulesetSpec | None = None) -> float:
        """Replace guard and owned tables (one transaction); returns seconds taken.

        Also the way to change the spec (groups, addresses, hash modes); counters restart.
        """
        if spec is not None:
            spec.check()
            self.spec = spec
        full = check_state(self.spec, state)
        t0 = time.perf_counter()
        try:
            self.nft.run(render_install(self.spec, full))
        except NftError as e:
            if "Operation not supported" not in str(e):
                raise
            self.nft.run(render_install(self.spec, full, take_over=True))  # a non-owner table
        self._state = full
        return time.perf_counter() - t0

    def update(self, state: Mapping[str, GroupBuckets]) -> UpdateStats:
        """Apply the difference to ``state`` as one atomic transaction (no-op if unchanged).

        On :class:`NftError` the kernel kept the previous state; :meth:`install` resyncs.
        """
        if self._state is None:
            raise NftError("update() before install()")
        t0 = time.perf_counter()
        full = check_state(self.spec, state)
        delta = delta_of_checked(self.spec, self._state, full)
        t1 = time.perf_counter()
        path = self._apply(delta) if delta.removed or delta.added else "none"
        t2 = time.perf_counter()
        self._state = full
        return UpdateStats(delta.added_count, delta.removed_count, t1 - t0, t2 - t1, path)

    def _apply(self, delta: Delta) -> str:
        if self.fast_path and self.nft.can_send_elements:
            try:
                self.nft.send_elements(self.spec.table, delta)
                return "netlink"
            except NftError as e:
                if e.code != errno.EPERM:
                    raise
                self.fast_path = False  # not the socket that owns our table: use libnftables
        self.nft.run(render_delta_json(self.spec, delta), json_mode=True)
        return "json"

    def read_state(self) -> dict[str, GroupBuckets]:
        """The bucket sets as the kernel holds them (for checks; slow for big sets)."""
        out: dict[str, GroupBuckets] = {}
        for group in self.spec.groups:
            found: dict[str, frozenset[int]] = {}
            for kind, name in set_names(group).items():
                items = self.nft.run_json(f"list set inet {self.spec.table} {name}")
                elems = items[0]["set"].get("elem", []) if items else []
                found[kind] = frozenset(int(e) for e in elems)
            out[group.name] = GroupBuckets(**found)
        return out

    def counters(self) -> dict[str, dict[str, int]]:
        """Per group: ``accepted_packets``/``_bytes`` and ``dropped_packets``/``_bytes``."""
        items = self.nft.run_json(f"list counters table inet {self.spec.table}")
        values = {
            i["counter"]["name"]: (int(i["counter"]["packets"]), int(i["counter"]["bytes"]))
            for i in items
            if "counter" in i
        }
        out: dict[str, dict[str, int]] = {}
        for group in self.spec.groups:
            row: dict[str, int] = {}
            for kind, name in counter_names(group).items():
                packets, nbytes = values.get(name, (0, 0))
                row[f"{kind}_packets"] = packets
                row[f"{kind}_bytes"] = nbytes
            out[group.name] = row
        return out

    def remove(self) -> None:
        """Clean stop: delete the owned and the guard table (one transaction)."""
        self.nft.run(render_remove(self.spec))
        self._state = None

    def close(self) -> None:
        """Drop the context if this object created it (the owned table then vanishes)."""
        if self._own_nft:
            self.nft.close()
