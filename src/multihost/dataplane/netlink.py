"""The nf_tables netlink fast path for bucket-map and lease updates (used by :mod:`.nft`).

Owns: encoding a :class:`~multihost.dataplane.rulesetdelta.Delta` as one nf_tables batch
(``NFT_MSG_DELSETELEM`` for the keys leaving a map, then ``NFT_MSG_NEWSETELEM`` for the
``key : data`` elements entering it, between batch begin/end, ``NLM_F_ACK`` on every
message); encoding a lease write the same way (:func:`encode_lease_batch`: flush the lease
set, then add its one-byte keys with an optional ``NFTA_SET_ELEM_TIMEOUT``, exactly what
``rulesettables.render_lease`` says in nft syntax, without libnftables' parser on every
renewal); finding the ``NETLINK_NETFILTER`` socket a libnftables context opened; sending a
batch on it and collecting the acknowledgements.

Must not: decide what to send (``rulesetdelta`` and ``rulesettables`` render,
``nft.Dataplane`` decides), open netlink sockets of its own (only the socket that owns the
table may change it), or call libnftables.

Message layout (``include/uapi/linux/netfilter/nf_tables.h``): ``NFTA_SET_ELEM_LIST_TABLE``,
``_SET`` and ``_ELEMENTS``, a nest of ``NFTA_LIST_ELEM``, each
``{ NFTA_SET_ELEM_KEY { NFTA_DATA_VALUE: u32, host order } }`` plus, when added,
``NFTA_SET_ELEM_DATA``: ``{ NFTA_DATA_VALUE: u8 }`` (a ``pkttype``) or
``{ NFTA_DATA_VERDICT { NFTA_VERDICT_CODE: be32 NFT_GOTO, NFTA_VERDICT_CHAIN: name } }``.
The ``_ELEMENTS`` nest length is 16 bits, so a map's keys go out in chunks of at most 64 KiB
of elements, built with numpy from a template (one element with the chunk's data) with
only the key varying.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

import numpy as np

from multihost.dataplane.ruleset import PKTTYPE_VALUES
from multihost.dataplane.rulesetdelta import Delta

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
NFPROTO_INET = 1
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
NFT_GOTO = -4
# attribute types
_LIST_TABLE, _LIST_SET, _LIST_ELEMENTS = 1, 2, 3
_LIST_ELEM = 1
_ELEM_KEY, _ELEM_DATA, _ELEM_TIMEOUT = 1, 2, 4
_DATA_VALUE, _DATA_VERDICT = 1, 2
_VERDICT_CODE, _VERDICT_CHAIN = 1, 2
_SO_SNDBUFFORCE = 32
_NLMSG = struct.Struct("=IHHII")
_MAX_CHUNK = 2048  # elements per message, at most
_NEST_MAX = 0xFFFF - 4  # payload of the 16-bit-length ELEMENTS nest


class BatchError(Exception):
    """The kernel refused a batch, or its answers were lost; ``code`` is the errno."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


def _nlattr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + bytes(-size % 4)


def _nlmsg(
    kind: int, flags: int, seq: int, body: bytes, *, family: int = 0, res_id: int = 0
) -> bytes:
    payload = struct.pack("=BBH", family, 0, socket.htons(res_id)) + body
    return _NLMSG.pack(_NLMSG.size + len(payload), kind, flags, seq, 0) + payload


def element_template(data: str | None) -> tuple[bytes, bytes]:
    """(bytes before the key, bytes after it) of one ``NFTA_LIST_ELEM``.

    ``data``: None (a key only, to delete), ``goto <chain>`` or a ``pkttype`` name.
    """
    key = _nlattr(_ELEM_KEY | NLA_F_NESTED, _nlattr(_DATA_VALUE, bytes(4)))
    payload = b""
    if data is not None:
        verb, _, chain = data.partition(" ")
        if verb == "goto":
            verdict = _nlattr(_VERDICT_CODE, struct.pack(">i", NFT_GOTO))
            verdict += _nlattr(_VERDICT_CHAIN, chain.encode() + b"\0")
            value = _nlattr(_DATA_VERDICT | NLA_F_NESTED, verdict)
        else:
            value = _nlattr(_DATA_VALUE, bytes((PKTTYPE_VALUES[data],)))
        payload = _nlattr(_ELEM_DATA | NLA_F_NESTED, value)
    elem = _nlattr(_LIST_ELEM | NLA_F_NESTED, key + payload)
    cut = len(elem) - len(payload) - 4  # the u32 key sits right before the data
    return elem[:cut], elem[cut + 4 :]


def _records(keys: np.ndarray, data: str | None) -> tuple[np.ndarray, int]:
    """The elements of ``keys`` as a structured array, and the bytes of one element."""
    pre, post = element_template(data)
    fields = [("pre", f"V{len(pre)}"), ("value", "=u4")] + [("post", f"V{len(post)}")] * bool(post)
    dtype = np.dtype(fields)
    recs = np.frombuffer((pre + bytes(4) + post) * len(keys), dtype=dtype).copy()
    recs["value"] = keys
    return recs, dtype.itemsize


def encode_element_batch(table: str, delta: Delta, seq: int) -> tuple[bytes, list[int]]:
    """One nf_tables batch applying ``delta`` to inet ``table``; the sequence numbers to ack."""
    begin = _nlmsg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, b"", res_id=NFNL_SUBSYS_NFTABLES)
    parts, acks = [begin], []
    work: list[tuple[int, str, tuple[int, ...], str | None]] = [
        (NFT_MSG_DELSETELEM, name, keys, None) for name, keys in delta.removed.items()
    ]
    work += [(NFT_MSG_NEWSETELEM, name, keys, data) for (name, data), keys in delta.added.items()]
    for verb, name, values, data in work:
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if verb == NFT_MSG_NEWSETELEM else 0)
        head = _nlattr(_LIST_TABLE, table.encode() + b"\0") + _nlattr(
            _LIST_SET, name.encode() + b"\0"
        )
        recs, size = _records(np.fromiter(values, dtype=np.uint32, count=len(values)), data)
        chunk = min(_MAX_CHUNK, _NEST_MAX // size)
        for i in range(0, len(recs), chunk):
            body = head + _nlattr(_LIST_ELEMENTS | NLA_F_NESTED, recs[i : i + chunk].tobytes())
            seq += 1
            kind = (NFNL_SUBSYS_NFTABLES << 8) | verb
            parts.append(_nlmsg(kind, flags, seq, body, family=NFPROTO_INET))
            acks.append(seq)
    seq += 1
    parts.append(_nlmsg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, b"", res_id=NFNL_SUBSYS_NFTABLES))
    return b"".join(parts), acks


def encode_lease_batch(
    table: str, set_name: str, keys: tuple[int, ...], expires_ms: int | None, seq: int
) -> tuple[bytes, list[int]]:
    """One batch setting inet ``table``'s lease set ``set_name`` (one-byte keys, e.g.
    ``meta nfproto`` values): flush it, then, unless ``expires_ms <= 0`` (lapsed), add
    ``keys``, with a timeout of ``expires_ms`` milliseconds (None: no expiry).  The sequence
    numbers to ack are returned with it."""
    begin = _nlmsg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, b"", res_id=NFNL_SUBSYS_NFTABLES)
    head = _nlattr(_LIST_TABLE, table.encode() + b"\0") + _nlattr(
        _LIST_SET, set_name.encode() + b"\0"
    )
    parts, acks = [begin], []
    seq += 1  # no ELEMENTS attribute: the kernel flushes the set
    kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELSETELEM
    parts.append(_nlmsg(kind, NLM_F_REQUEST | NLM_F_ACK, seq, head, family=NFPROTO_INET))
    acks.append(seq)
    if expires_ms is None or expires_ms > 0:
        timeout = (
            b"" if expires_ms is None else _nlattr(_ELEM_TIMEOUT, struct.pack(">Q", expires_ms))
        )
        elems = b"".join(
            _nlattr(
                _LIST_ELEM | NLA_F_NESTED,
                _nlattr(_ELEM_KEY | NLA_F_NESTED, _nlattr(_DATA_VALUE, bytes((k,)))) + timeout,
            )
            for k in keys
        )
        seq += 1
        kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM
        body = head + _nlattr(_LIST_ELEMENTS | NLA_F_NESTED, elems)
        flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE
        parts.append(_nlmsg(kind, flags, seq, body, family=NFPROTO_INET))
        acks.append(seq)
    seq += 1
    parts.append(_nlmsg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, b"", res_id=NFNL_SUBSYS_NFTABLES))
    return b"".join(parts), acks


def open_sockets() -> set[tuple[int, str]]:
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


def netfilter_socket(candidates: set[tuple[int, str]]) -> socket.socket | None:
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


def send_batch(sock: socket.socket, data: bytes, acks: list[int]) -> None:
    """Send one batch and read every acknowledgement; :class:`BatchError` on any refusal.

    The kernel runs a batch as one transaction: on error nothing of it is applied.
    """
    if len(data) > sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2:
        sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, 2 * len(data))
    try:
        sock.send(data)  # nfnetlink runs the batch and queues every ack before returning
    except OSError as e:
        raise BatchError(f"netlink send: {e}", e.errno) from e
    pending, failed = set(acks), []
    while True:  # the socket is non-blocking (libnftables set O_NONBLOCK)
        try:
            buf = sock.recv(1 << 20)
        except BlockingIOError:
            break
        except OSError as e:  # e.g. ENOBUFS: replies were lost, the outcome is unknown
            raise BatchError(f"netlink receive: {e}", e.errno) from e
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
        raise BatchError(f"kernel refused the element batch: {os.strerror(code)}", code)
    if pending:
        raise BatchError(f"netlink: {len(pending)} of {len(acks)} acknowledgements missing")
