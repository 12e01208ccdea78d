"""The heartbeat this node sends: its view, advert, eligibility and acks, as one value.

Owns: :func:`outgoing` (the :class:`~multihost.membership.wire.Heartbeat` for the core's
current state: view and ack masks from the peer records, the advert from the kernel-state
bound).  Encoding and the MAC are :mod:`.wire`'s.

Must not: keep state, read clocks or decide anything; the core passes every field in.
"""

from __future__ import annotations

from collections.abc import Iterable

from multihost.membership.config import MembershipConfig
from multihost.membership.ownership import mask_of
from multihost.membership.state import MemberState, PeerRecord
from multihost.membership.wire import Ack, Heartbeat


def outgoing(
    config: MembershipConfig,
    boot: bytes,
    *,
    seq: int,
    view: frozenset[str],
    advert: tuple[int, int],
    applied_epoch: int,
    suspended_groups: int,
    draining: bool,
    handover: bool,
    peers: Iterable[PeerRecord],
) -> Heartbeat:
    """Heartbeat ``seq``: ``advert`` is (applied live-set mask, held groups); it acks every
    alive peer's latest seq (peers ack exactly the members alive in their view)."""
    live, held = advert
    acks = {
        p.slot: Ack(p.boot, p.seq)
        for p in peers
        if p.state is MemberState.ALIVE and p.boot is not None
    }
    return Heartbeat(
        cluster=config.cluster,
        sender=config.node,
        slot=config.slot,
        boot=boot,
        seq=seq,
        digest=config.wire_digest,
        view=mask_of(config.members[n] for n in view),
        applied_view=live,
        applied_epoch=applied_epoch,
        held_groups=held,
        suspended_groups=suspended_groups,
        draining=draining,
        handover=handover,
        acks=acks,
    )
