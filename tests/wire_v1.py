"""Test helper: a version-1 heartbeat encoder (8-bit slot masks), as the previous release
sent them, to check that version-2 nodes recognise and refuse them.  Not in the package:
nothing there may produce version 1."""

from __future__ import annotations

import struct

from multihost.membership.wire import MAC_SIZE, MAGIC, Heartbeat, mac

_HEADER_V1 = struct.Struct(">4sBBBBBBBBBBB8sQQ")
_ACK = struct.Struct(">8sQ")


def encode_v1(hb: Heartbeat, key: bytes) -> bytes:
    cluster, sender = hb.cluster.encode(), hb.sender.encode()
    held = hb.held_groups.to_bytes((hb.held_groups.bit_length() + 7) // 8, "little")
    susp = hb.suspended_groups.to_bytes((hb.suspended_groups.bit_length() + 7) // 8, "little")
    assert hb.slot < 8 and hb.view < 256 and max(hb.acks, default=0) < 8
    applied = hb.applied_view & 0xFF  # slots 8..15 do not exist in version 1
    ack_mask = sum(1 << s for s in hb.acks)
    acks = b"".join(_ACK.pack(hb.acks[s].boot, hb.acks[s].seq) for s in sorted(hb.acks))
    flags = (1 if hb.draining else 0) | (2 if hb.handover else 0)
    header = _HEADER_V1.pack(
        MAGIC, 1, flags, hb.slot, hb.view, applied, ack_mask, len(held), len(susp),
        len(cluster), len(sender), len(hb.digest), hb.boot, hb.seq, hb.applied_epoch,
    )  # fmt: skip
    body = header + cluster + sender + hb.digest + held + susp + acks
    out = body + mac(key, body)
    assert len(out) > MAC_SIZE
    return out
