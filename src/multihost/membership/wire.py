"""Heartbeat wire format: a versioned binary layout authenticated with HMAC-SHA256.

Owns: :class:`Heartbeat` (the decoded message), :func:`encode`, :func:`decode` and the typed
:class:`WireError` with its closed set of reasons.  Layout of version 2 (big-endian, see
``docs/membership.md`` for the table)::

    header  magic "MHhb", version (2), flags, slot, held_len, suspended_len, cluster_len,
            sender_len, digest_len, view (u16), applied_view (u16), ack_mask (u16),
            boot id (8), seq (u64), applied epoch (u64)
    body    cluster, sender, digest, held-groups bitmap, suspended-groups bitmap,
            one (boot, seq) ack per ack_mask bit (ascending slots)
    mac     HMAC-SHA256(key, everything before it), 32 bytes

Slot masks are 16 bits wide (slots 0..15).  Version 1 (8-bit masks, 8 slots) is
*recognised and refused*: an authenticated version-1 heartbeat raises ``old-version``
naming its sender (:func:`decode_v1` parses it for that, and for the golden test; no
version-1 message ever becomes a :class:`Heartbeat` the core acts on).

The MAC is the last 32 bytes of every version (the framing invariant), and it is checked
*before* anything else is parsed: unauthenticated bytes never reach the parser, and any
flipped bit of a genuine message is reported as ``bad-mac``.

Must not: know clocks, sockets, configuration files or protocol state.  :func:`decode`
never raises anything but :class:`WireError`; :func:`encode` raises ``ValueError`` for
fields that cannot be represented (a programming error of the caller).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NamedTuple, get_args

MAGIC: Final = b"MHhb"
VERSION: Final = 2
OLD_VERSION: Final = 1  # recognised only to be refused with a clear reason
MAC_SIZE: Final = 32
MAX_SIZE: Final = 1024
BOOT_ID_SIZE: Final = 8
SLOTS: Final = 16
ALL_SLOTS: Final = (1 << SLOTS) - 1  # every slot mask bit
SLOTS_V1: Final = 8
MAX_NAME_BYTES: Final = 63
MAX_DIGEST_BYTES: Final = 64
MAX_HELD_BYTES: Final = 64  # room for 512 traffic IP groups
MAX_U64: Final = 2**64 - 1

FLAG_DRAINING: Final = 0x01
#: The sender still has established flows in buckets it gave away (connection-preserving
#: handover, docs/handover.md); new owners keep those buckets ``incoming`` until it clears.
FLAG_HANDOVER: Final = 0x02
KNOWN_FLAGS: Final = FLAG_DRAINING | FLAG_HANDOVER

WireReason = Literal[
    "bad-mac", "truncated", "oversize", "bad-magic", "wrong-version", "old-version", "malformed"
]
WIRE_REASONS: Final[tuple[str, ...]] = get_args(WireReason)

_HEADER: Final = struct.Struct(">4sBBBBBBBBHHH8sQQ")
_HEADER_V1: Final = struct.Struct(">4sBBBBBBBBBBB8sQQ")
_ACK: Final = struct.Struct(">8sQ")
_ACKS: Final = tuple(struct.Struct(">" + "8sQ" * n) for n in range(SLOTS + 1))  # n acks at once
MIN_SIZE: Final = _HEADER_V1.size + MAC_SIZE  # the shorter header (version 1)


class WireError(Exception):
    """A datagram that is not a valid heartbeat; ``reason`` is one of :data:`WIRE_REASONS`."""

    def __init__(self, reason: WireReason, detail: str = "", sender: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason: WireReason = reason
        self.detail = detail
        self.sender = sender  # old-version: the (authenticated) sender's name


class Ack(NamedTuple):
    """The highest heartbeat ``seq`` accepted from a member's incarnation ``boot`` (a named
    tuple: one is built per peer per received heartbeat, so it must be cheap)."""

    boot: bytes
    seq: int


@dataclass(frozen=True)
class Heartbeat:
    """One decoded heartbeat.  Bitmasks use bit ``s`` for member slot ``s``.

    ``view``: slots the sender believes alive (itself included).  ``applied_view`` and
    ``held_groups`` bound what the sender's kernel may serve: in group ``g`` (bit ``g`` of
    ``held_groups``, groups indexed in sorted-name order) at most the sender's share under the
    live set ``applied_view``; nothing in groups whose bit is clear.  ``applied_epoch`` is
    the last claims epoch the sender's agent confirmed.  ``suspended_groups``: groups in which
    the sender takes no share because an alive peer of the group cannot hear it.  ``acks``
    maps a slot to the highest (boot, seq) the sender accepted from that member.
    """

    cluster: str
    sender: str
    slot: int
    boot: bytes
    seq: int
    digest: bytes
    view: int = 0
    applied_view: int = 0
    applied_epoch: int = 0
    held_groups: int = 0
    suspended_groups: int = 0
    draining: bool = False
    handover: bool = False
    acks: Mapping[int, Ack] = field(default_factory=dict)


_KEYED: dict[bytes, Any] = {}  # key -> HMAC-SHA256 state after the key (copied per message)


def mac(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA256 of ``data``: the keyed state is computed once per key and copied."""
    keyed = _KEYED.get(key)
    if keyed is None:
        if len(_KEYED) >= 8:  # keys change only on a reload; keep the cache tiny
            _KEYED.clear()
        keyed = _KEYED[key] = hmac.new(key, digestmod=hashlib.sha256)
    h = keyed.copy()
    h.update(data)
    digest: bytes = h.digest()
    return digest


_MASK_SLOTS: dict[int, tuple[int, ...]] = {}  # slot mask -> its set bits (cached, bounded)


def _mask_slots(mask: int) -> tuple[int, ...]:
    """The set bits of a slot mask, ascending (the order acks follow on the wire)."""
    slots = _MASK_SLOTS.get(mask)
    if slots is None:
        if len(_MASK_SLOTS) >= 1024:
            _MASK_SLOTS.clear()
        slots = _MASK_SLOTS[mask] = tuple(s for s in range(mask.bit_length()) if mask >> s & 1)
    return slots


def _name_bytes(value: str, what: str) -> bytes:
    raw = value.encode("utf-8")
    if not 1 <= len(raw) <= MAX_NAME_BYTES:
        raise ValueError(f"{what} must be 1..{MAX_NAME_BYTES} UTF-8 bytes, got {len(raw)}")
    return raw


def _check_range(value: int, hi: int, what: str) -> None:
    if not 0 <= value <= hi:
        raise ValueError(f"{what} {value} is outside 0..{hi}")


def _bitmap(value: int, what: str) -> bytes:
    if value < 0:
        raise ValueError(f"{what} bitmap must be non-negative")
    raw = value.to_bytes((value.bit_length() + 7) // 8, "little")
    if len(raw) > MAX_HELD_BYTES:
        raise ValueError(f"{what} bitmap longer than {MAX_HELD_BYTES} bytes")
    return raw


def encode(hb: Heartbeat, key: bytes) -> bytes:
    """The authenticated datagram for ``hb``."""
    cluster = _name_bytes(hb.cluster, "cluster name")
    sender = _name_bytes(hb.sender, "sender name")
    if len(hb.digest) > MAX_DIGEST_BYTES:
        raise ValueError(f"digest longer than {MAX_DIGEST_BYTES} bytes")
    if len(hb.boot) != BOOT_ID_SIZE:
        raise ValueError(f"boot id must be {BOOT_ID_SIZE} bytes")
    _check_range(hb.slot, SLOTS - 1, "slot")
    _check_range(hb.seq, MAX_U64, "seq")
    _check_range(hb.applied_epoch, MAX_U64, "applied epoch")
    _check_range(hb.view, ALL_SLOTS, "view mask")
    _check_range(hb.applied_view, ALL_SLOTS, "applied view mask")
    held = _bitmap(hb.held_groups, "held groups")
    suspended = _bitmap(hb.suspended_groups, "suspended groups")
    ack_mask = 0
    acks = bytearray()
    for slot in sorted(hb.acks):
        _check_range(slot, SLOTS - 1, "ack slot")
        ack = hb.acks[slot]
        if len(ack.boot) != BOOT_ID_SIZE:
            raise ValueError(f"ack boot id must be {BOOT_ID_SIZE} bytes")
        _check_range(ack.seq, MAX_U64, "ack seq")
        ack_mask |= 1 << slot
        acks += _ACK.pack(ack.boot, ack.seq)
    flags = (FLAG_DRAINING if hb.draining else 0) | (FLAG_HANDOVER if hb.handover else 0)
    header = _HEADER.pack(
        MAGIC,
        VERSION,
        flags,
        hb.slot,
        len(held),
        len(suspended),
        len(cluster),
        len(sender),
        len(hb.digest),
        hb.view,
        hb.applied_view,
        ack_mask,
        hb.boot,
        hb.seq,
        hb.applied_epoch,
    )
    body = b"".join((header, cluster, sender, hb.digest, held, suspended, acks))
    out = body + mac(key, body)
    if len(out) > MAX_SIZE:  # unreachable with the limits above; kept as a guard
        raise ValueError(f"heartbeat of {len(out)} bytes exceeds {MAX_SIZE}")
    return out


def decode(data: bytes, key: bytes) -> Heartbeat:
    """Authenticate and parse ``data``; raise :class:`WireError` for anything else."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError("malformed", f"expected bytes, got {type(data).__name__}")
    raw = bytes(data)
    if len(raw) > MAX_SIZE:
        raise WireError("oversize", f"{len(raw)} bytes > {MAX_SIZE}")
    if len(raw) < MIN_SIZE:
        raise WireError("truncated", f"{len(raw)} bytes < {MIN_SIZE}")
    body, tag = raw[:-MAC_SIZE], raw[-MAC_SIZE:]
    if not hmac.compare_digest(mac(key, body), tag):
        raise WireError("bad-mac")
    try:
        return _parse(body)
    except WireError:
        raise
    except Exception as exc:  # defensive: the parser checks lengths itself
        raise WireError("malformed", repr(exc)) from exc


def _parse(body: bytes) -> Heartbeat:
    magic, version = body[:4], body[4]
    if magic != MAGIC:
        raise WireError("bad-magic", magic.hex())
    if version == OLD_VERSION:
        old = _parse_v1(body)
        raise WireError(
            "old-version",
            f"{old.sender!r} sends heartbeat version {OLD_VERSION} (8 slots); this node speaks"
            f" version {VERSION} (16 slots): upgrade every member",
            sender=old.sender,
        )
    if version != VERSION:
        raise WireError("wrong-version", str(version))
    if len(body) < _HEADER.size:
        raise WireError("truncated", f"body {len(body)} < header {_HEADER.size}")
    (
        _magic,
        _version,
        flags,
        slot,
        held_len,
        susp_len,
        cluster_len,
        sender_len,
        digest_len,
        view,
        applied_view,
        ack_mask,
        boot,
        seq,
        epoch,
    ) = _HEADER.unpack_from(body)
    return _fields(
        body,
        header=_HEADER.size,
        slots=SLOTS,
        flags=flags,
        slot=slot,
        masks=(view, applied_view, ack_mask),
        lengths=(cluster_len, sender_len, digest_len, held_len, susp_len),
        boot=boot,
        seq=seq,
        epoch=epoch,
    )


def decode_v1(data: bytes, key: bytes) -> Heartbeat:
    """Authenticate and parse a *version 1* datagram (8-bit slot masks).  Only for
    recognising old senders (their name in the refusal) and the golden test: the core
    never accepts one (:func:`decode` refuses it as ``old-version``)."""
    raw = bytes(data)
    if len(raw) < MIN_SIZE or len(raw) > MAX_SIZE:
        raise WireError("truncated" if len(raw) < MIN_SIZE else "oversize", str(len(raw)))
    body, tag = raw[:-MAC_SIZE], raw[-MAC_SIZE:]
    if not hmac.compare_digest(mac(key, body), tag):
        raise WireError("bad-mac")
    if body[:4] != MAGIC:
        raise WireError("bad-magic", body[:4].hex())
    if body[4] != OLD_VERSION:
        raise WireError("wrong-version", str(body[4]))
    return _parse_v1(body)


def _parse_v1(body: bytes) -> Heartbeat:
    (
        _magic,
        _version,
        flags,
        slot,
        view,
        applied_view,
        ack_mask,
        held_len,
        susp_len,
        cluster_len,
        sender_len,
        digest_len,
        boot,
        seq,
        epoch,
    ) = _HEADER_V1.unpack_from(body)
    return _fields(
        body,
        header=_HEADER_V1.size,
        slots=SLOTS_V1,
        flags=flags,
        slot=slot,
        masks=(view, applied_view, ack_mask),
        lengths=(cluster_len, sender_len, digest_len, held_len, susp_len),
        boot=boot,
        seq=seq,
        epoch=epoch,
    )


def _fields(
    body: bytes,
    *,
    header: int,
    slots: int,
    flags: int,
    slot: int,
    masks: tuple[int, int, int],
    lengths: tuple[int, int, int, int, int],
    boot: bytes,
    seq: int,
    epoch: int,
) -> Heartbeat:
    """The checks and the variable part shared by both versions (after the header)."""
    view, applied_view, ack_mask = masks
    cluster_len, sender_len, digest_len, held_len, susp_len = lengths
    if flags & ~KNOWN_FLAGS:
        raise WireError("malformed", f"unknown flags {flags:#04x}")
    if slot >= slots:
        raise WireError("malformed", f"slot {slot}")
    if not (1 <= cluster_len <= MAX_NAME_BYTES and 1 <= sender_len <= MAX_NAME_BYTES):
        raise WireError("malformed", "name length")
    if digest_len > MAX_DIGEST_BYTES or max(held_len, susp_len) > MAX_HELD_BYTES:
        raise WireError("malformed", "digest or group bitmap length")
    n_acks = ack_mask.bit_count()
    variable = cluster_len + sender_len + digest_len + held_len + susp_len
    expected = header + variable + n_acks * _ACK.size
    if len(body) < expected:
        raise WireError("truncated", f"body {len(body)} < {expected}")
    if len(body) > expected:
        raise WireError("malformed", f"{len(body) - expected} trailing bytes")
    pos = header
    try:
        cluster = body[pos : pos + cluster_len].decode("utf-8")
        pos += cluster_len
        sender = body[pos : pos + sender_len].decode("utf-8")
        pos += sender_len
    except UnicodeDecodeError as exc:
        raise WireError("malformed", "name is not UTF-8") from exc
    digest = body[pos : pos + digest_len]
    pos += digest_len
    held = int.from_bytes(body[pos : pos + held_len], "little")
    pos += held_len
    suspended = int.from_bytes(body[pos : pos + susp_len], "little")
    pos += susp_len
    acks: dict[int, Ack] = {}
    if n_acks:  # every (boot, seq) in one unpack, paired with the mask's ascending slots
        values = _ACKS[n_acks].unpack_from(body, pos)
        new = tuple.__new__
        i = 0
        for s in _mask_slots(ack_mask):
            acks[s] = new(Ack, (values[i], values[i + 1]))
            i += 2
    return Heartbeat(  # positional (in field order): cheaper than keywords, once per datagram
        cluster,
        sender,
        slot,
        boot,
        seq,
        digest,
        view,
        applied_view,
        epoch,
        held,
        suspended,
        bool(flags & FLAG_DRAINING),
        bool(flags & FLAG_HANDOVER),
        acks,
    )
