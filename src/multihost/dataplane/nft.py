"""Thin shell over the kernel's nftables: a ctypes binding to ``libnftables.so.1`` and the
:class:`Dataplane` that applies the scripts :mod:`multihost.dataplane.rulesettables` and
:mod:`multihost.dataplane.rulesetdelta` render.

Owns: the persistent libnftables context (:class:`Nft`) whose netlink socket *owns* the
``flags owner`` table, so the kernel deletes that table when the process dies (fail-closed)
and no other process may change it; entering a network namespace for that socket; the
applied bucket state and the delta bookkeeping of :meth:`Dataplane.update`; reading
counters and bucket maps back from the kernel.

Must not: build nft syntax itself (everything it sends comes from ``rulesettables`` and
``rulesetdelta``), touch links or addresses (that is ``hostsetup``), or spawn the ``nft``
binary.

Element updates (:meth:`Dataplane.update`) take a fast path: the delta is encoded as one
nf_tables netlink batch (:mod:`multihost.dataplane.netlink`: map elements out, then
``key : goto chain`` elements in) and sent on the context's *own* netlink socket, found as
the one ``NETLINK_NETFILTER`` descriptor ``nft_ctx_new`` opened, used through a ``dup``
(only ownership by that socket lets us touch the owned table).  libnftables needs ~1.3 us
per element to parse and evaluate, the kernel well under 1 us: a few thousand elements take
a few ms this way against tens of ms through libnftables JSON or text (the text form is
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
output) for the ``flags`` of an owner table; this module only lists maps and counters.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from multihost.dataplane.netlink import (
    BatchError,
    encode_element_batch,
    encode_lease_batch,
    netfilter_socket,
    open_sockets,
    send_batch,
)
from multihost.dataplane.nfcounters import read_counters
from multihost.dataplane.ruleset import (
    LEASE_KEY_VALUES,
    LEASE_SET,
    SET_KINDS,
    GroupBuckets,
    GroupSpec,
    ReturnSpec,
    RulesetSpec,
    bucket_map,
    check_state,
    counter_names,
    handover_map,
    kind_chains,
)
from multihost.dataplane.rulesetdelta import Delta, delta_of_checked, render_delta_json
from multihost.dataplane.rulesettables import render_install, render_lease, render_remove

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


_ctx_lock = threading.Lock()


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
            before = open_sockets()
            ctx = self._lib.nft_ctx_new(NFT_CTX_DEFAULT)
            opened = open_sockets() - before
        if not ctx:
            raise NftError("nft_ctx_new failed")
        self._ctx: int | None = ctx
        self._nl = netfilter_socket(opened)
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
        self._send_batch(lambda seq: encode_element_batch(table, delta, seq))

    def send_lease(self, table: str, expires_ms: int | None) -> None:
        """Set inet ``table``'s lease set as :func:`~.rulesettables.render_lease` would, as one
        netlink batch on the context's socket (atomic; :class:`NftError` with the errno)."""
        self._send_batch(
            lambda seq: encode_lease_batch(table, LEASE_SET, LEASE_KEY_VALUES, expires_ms, seq)
        )

    def _send_batch(self, encode: Callable[[int], tuple[bytes, list[int]]]) -> None:
        with self._lock:
            sock = self._nl
            if self._ctx is None or sock is None:
                raise NftError("no netlink socket of a live nft context")
            data, acks = encode(self._seq)
            self._seq += len(acks) + 2
            try:
                send_batch(sock, data, acks)
            except BatchError as e:
                raise NftError(str(e), e.code) from e

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

    backend = "nft"
    lease_inline = False  # a transaction: it may wait for the kernel's nft mutex

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
        if self._netlink(lambda: self.nft.send_elements(self.spec.table, delta)):
            return "netlink"
        self.nft.run(render_delta_json(self.spec, delta), json_mode=True)
        return "json"

    def set_lease(self, expires_ms: int | None) -> None:
        """The kernel lease (see :func:`render_lease`): ``None`` held without expiry,
        ``> 0`` held for that many milliseconds, ``<= 0`` lapsed (one transaction)."""
        if self._state is None:
            raise NftError("set_lease() before install()")
        # a renewal every heartbeat interval: no libnftables parse each time
        if not self._netlink(lambda: self.nft.send_lease(self.spec.table, expires_ms)):
            self.nft.run(render_lease(self.spec, expires_ms))

    def _netlink(self, send: Callable[[], None]) -> bool:
        """Try ``send`` on the fast path (raw netlink on the context's socket); False: the
        caller writes through libnftables instead (no fast path, or this socket does not
        own the table: then never again)."""
        if not (self.fast_path and self.nft.can_send_elements):
            return False
        try:
            send()
            return True
        except NftError as e:
            if e.code != errno.EPERM:
                raise
            self.fast_path = False  # not the socket that owns our table: use libnftables
            return False

    def lease_held(self) -> bool:
        """Whether the kernel's lease elements exist (for checks)."""
        items = self.nft.run_json(f"list set inet {self.spec.table} {LEASE_SET}")
        return bool(items and items[0]["set"].get("elem"))

    def read_state(self) -> dict[str, GroupBuckets]:
        """The bucket maps as the kernel holds them (for checks; slow for big maps)."""
        out: dict[str, GroupBuckets] = {}
        for group in self.spec.groups:
            found: dict[str, dict[int, str]] = {}
            for name in (bucket_map(group), handover_map(group)):
                items = self.nft.run_json(f"list map inet {self.spec.table} {name}")
                elems = items[0]["map"].get("elem", []) if items else []
                found[name] = {
                    int(k): v if isinstance(v, str) else f"goto {v['goto']['target']}"
                    for k, v in elems
                }
            kinds: dict[str, set[int]] = {k: set() for k in SET_KINDS}
            goto = {f"goto {chain}": kind for kind, chain in kind_chains(group).items()}
            handover = found[handover_map(group)]
            for key, data in found[bucket_map(group)].items():
                kind = "owned" if data == "host" else goto.get(handover.get(key, ""), "?")
                kinds.setdefault(kind, set()).add(key)
            stray = set(found[handover_map(group)]) - set(found[bucket_map(group)])
            if kinds.keys() - set(SET_KINDS) or stray:
                raise NftError(f"group {group.name}: the two bucket maps disagree")
            out[group.name] = GroupBuckets(**{k: frozenset(v) for k, v in kinds.items()})
        return out

    def counters(self) -> dict[str, dict[str, int]]:
        """Per group (return groups too): ``accepted_packets``/``_bytes`` and
        ``dropped_packets``/``_bytes``.  A return group's replies in handover buckets are
        counted by its front group (they share the handover chains)."""
        with netns_entered(self.nft.netns):  # netlink, not libnftables: see nfcounters
            values = read_counters(self.spec.table)
        out: dict[str, dict[str, int]] = {}
        every: list[GroupSpec | ReturnSpec] = [*self.spec.groups, *self.spec.returns]
        for group in every:
            row: dict[str, int] = {}
            for kind, name in counter_names(group).items():
                packets, nbytes = values.get(name, (0, 0))
                row[f"{kind}_packets"] = packets
                row[f"{kind}_bytes"] = nbytes
            out[group.name] = row
        return out

    def describe(self) -> dict[str, Any]:
        """For ``status``: the backend (the XDP-only keys are null)."""
        return {"backend": "nft", "mode": None, "program_id": None}

    def flow_rows(self) -> list[tuple[str, int, str, int, int, int | None]]:
        """This node's flows to traffic IPs: the conntrack dump (blocks: run in a thread)."""
        from multihost.dataplane.conntrack import dump_entries

        with netns_entered(self.nft.netns):
            return dump_entries()

    def remove(self) -> None:
        """Clean stop: delete the owned and the guard table (one transaction)."""
        self.nft.run(render_remove(self.spec))
        self._state = None

    def close(self) -> None:
        """Drop the context if this object created it (the owned table then vanishes)."""
        if self._own_nft:
            self.nft.close()
