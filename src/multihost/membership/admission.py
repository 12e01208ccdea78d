"""Admission of datagrams: which authenticated heartbeats may change membership at all.

Owns: :func:`admit`, the screening every datagram passes before the core acts on it:
decode and authenticate (:mod:`.wire`; an authenticated version-1 heartbeat is refused
as ``old-version`` with its sender named, never mixed in), then reject another cluster's
heartbeats, our own name (looped back, or a duplicate node), senders not configured or
with the wrong slot, and replays (a sequence number not newer for the sender's
incarnation, or an incarnation already superseded).  A configuration-digest mismatch is
*not* decided here: the sender is then known and authenticated, and the core records it
as ``mismatch``.

:class:`RefusalLogs` decides which refusals deserve a log line (once each): another
incarnation of our own name (a duplicate node), a version-1 sender.

Must not: mutate peer records, read clocks or emit anything itself; it returns verdicts
and the :class:`~.effects.Log` values the core emits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from multihost.membership.effects import Log
from multihost.membership.state import PeerRecord
from multihost.membership.wire import Heartbeat, WireError, decode


@dataclass(frozen=True)
class Admitted:
    hb: Heartbeat
    peer: PeerRecord
    new_boot: bool  # first heartbeat of an incarnation we have not heard before


@dataclass(frozen=True)
class Refused:
    reason: str  # one of effects.REJECT_REASONS
    sender: str | None
    boot: bytes | None = None  # for "self": the boot id it carried
    detail: str = ""  # for "old-version": what the sender speaks and what we do


def admit(
    datagram: bytes, key: bytes, cluster: str, me: str, peers: Mapping[str, PeerRecord]
) -> Admitted | Refused:
    try:
        hb = decode(datagram, key)
    except WireError as exc:
        return Refused(exc.reason, exc.sender, detail=exc.detail if exc.sender else "")
    if hb.cluster != cluster:
        return Refused("other-cluster", hb.sender)
    if hb.sender == me:
        return Refused("self", hb.sender, hb.boot)
    peer = peers.get(hb.sender)
    if peer is None or peer.slot != hb.slot:
        return Refused("unknown-sender", hb.sender)
    if hb.boot == peer.boot:
        if hb.seq <= peer.seq:
            return Refused("replay", hb.sender)
        return Admitted(hb, peer, new_boot=False)
    if hb.boot in peer.old_boots:
        return Refused("replay", hb.sender)
    return Admitted(hb, peer, new_boot=True)


@dataclass
class RefusalLogs:
    """Refusals already logged: boot ids of impostors (our name, another boot id) and
    senders of version-1 heartbeats.  ``own_boot``: this node's boot id."""

    own_boot: bytes
    impostors: set[bytes] = field(default_factory=set)
    old_senders: set[str | None] = field(default_factory=set)

    def logs(self, r: Refused) -> list[Log]:
        """The log lines ``r`` deserves (each impostor and old sender once)."""
        if r.boot is not None and r.boot != self.own_boot and r.boot not in self.impostors:
            self.impostors.add(r.boot)
            return [Log("error", "duplicate-node-name", {"boot": r.boot.hex()})]
        if r.reason == "old-version" and r.sender not in self.old_senders:
            self.old_senders.add(r.sender)
            return [Log("error", "old-wire-version", {"sender": r.sender, "detail": r.detail})]
        return []
