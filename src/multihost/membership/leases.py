"""Lease and hold arithmetic of the membership core, as pure functions of recorded facts.

Owns: when this node's lease from a peer expires (from the peer's ack of one of our
heartbeats and the time we sent it), when a peer is *suspect* and need not give us a lease
(:func:`suspect`, :func:`exempt`), when a departed member's lease from a third node has
provably expired (from that node's heartbeats no longer acking it), and the bound on what
the kernel may serve across not-yet-confirmed claim sets (:class:`KernelState`,
:func:`advertised`).

Must not: keep state or read clocks; every time is an argument or recorded in a peer record.
The reasoning behind each bound is in ``docs/membership.md`` ("Leases").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from multihost.membership.effects import Log
from multihost.membership.state import PeerRecord
from multihost.membership.wire import ALL_SLOTS

NEVER: Final = float("-inf")  # an expiry that has always passed


@dataclass(frozen=True)
class Timing:
    """``jitter`` bounds a heartbeat's lateness (sender scheduling plus the spread and bound
    of the one-way delay): assumption A4 in ``docs/membership.md``."""

    dead_after: float
    hold: float
    margin: float
    interval: float = 0.0
    jitter: float = 0.0

    @property
    def suspect_after(self) -> float:
        """Silence after which a live peer with a working link would have been heard."""
        return self.interval + self.jitter

    @property
    def ack_age_max(self) -> float:
        """Oldest our acked heartbeat can be, at the receipt of a peer's heartbeat, while
        that peer hears us: one interval of ours plus two lateness bounds."""
        return self.interval + 2 * self.jitter


@dataclass(frozen=True)
class KernelState:
    """A claim set the kernel may serve: its epoch, live set (slot mask), held groups."""

    epoch: int
    eligible: int
    held: int


def lease_expiry(
    peer: PeerRecord, slot: int, boot: bytes, sent_at: Mapping[int, float], t: Timing
) -> float | None:
    """Until when ``peer`` cannot have declared us (``slot``, ``boot``) dead, minus the
    apply margin: it acked our seq ``n``, so it heard us no earlier than we sent ``n``;
    or, if later, its newcomer lease (:func:`newcomer_until`)."""
    ack = peer.heartbeat.acks.get(slot) if peer.heartbeat is not None else None
    sent = sent_at.get(ack.seq) if ack is not None and ack.boot == boot else None
    acked = None if sent is None else sent + t.dead_after + t.hold - t.margin
    young = peer.newcomer_until
    if young is None:
        return acked
    return young if acked is None else max(acked, young)


def newcomer_until(received: float, t: Timing) -> float:
    """The newcomer lease of a peer whose first heartbeat (seq 1 of an incarnation) arrived
    at ``received``.  A core sends seq 1 at its first input and starts its start-up grace
    then; it can hear us no earlier, so it declares us dead no earlier than that plus
    ``dead_after``, and takes an unheard member's buckets no earlier than the grace's end.
    Its seq 1 left at most ``jitter`` (the delay bound, A4) before ``received``: until this
    return value the newcomer can take nothing of ours, whether or not it has heard us."""
    return received - t.jitter + t.dead_after + t.hold - t.margin


def suspect(peer: PeerRecord, now: float, t: Timing) -> bool:
    """Nothing has arrived from ``peer`` for longer than ``suspect_after`` (while this node
    could run: :meth:`.PeerRecord.excuse`): under A4 it has crashed, or its link to us has
    failed."""
    return peer.silent_from is not None and now >= peer.silent_from + t.suspect_after


def paused(peers: Iterable[PeerRecord], due: float | None, now: float, jitter: float) -> list[Log]:
    """An input at ``now``, later than the deadline ``due`` the core handed out by more than
    the lateness bound: this node could not run meanwhile (its process or VM was stopped).
    The peers' silence in that time is no evidence (``docs/membership.md``, "Pauses"), so it
    counts towards neither suspicion nor death: declaring a peer dead later, or needing its
    lease longer, is always safe.  Returns the log line for a pause."""
    if due is None or now <= due + jitter:
        return []
    for p in peers:
        p.excuse(due + jitter, now)
    return [Log("warning", "paused", {"ms": round((now - due) * 1000, 1)})]


def exempt(
    peer: PeerRecord,
    slot: int,
    boot: bytes,
    *,
    need: int,
    now: float,
    t: Timing,
    witnesses: Iterable[PeerRecord] = (),
) -> bool:
    """May we serve without ``peer``'s lease?  Only if it is suspect and its last heartbeat
    showed it hearing us: it acked (seq >= ``need``) one of our heartbeats sent at most
    ``ack_age_max`` before that heartbeat arrived.  Then it cannot declare us dead before
    ``last_heard - ack_age_max + dead_after``, and a take by it needs our silence towards
    it *and* its silence towards us (bidirectional loss, docs/membership.md).  A peer we
    hear but that stopped acking us is never exempt: its stale acks stop us at once.  A
    suspect newcomer that never acked us is exempt too (its grace, :func:`newcomer_until`).

    ``witnesses`` (the other alive peers) end the exemption: a heartbeat of theirs acking
    ``peer``'s incarnation two or more seqs beyond the last we heard shows it alive (its
    link to us is failing), not crashed -- in a crash a witness may have heard at most the
    one last heartbeat we lost."""
    if not suspect(peer, now, t) or peer.heartbeat is None or peer.last_heard is None:
        return False
    for x in witnesses:
        seen = x.heartbeat.acks.get(peer.slot) if x.heartbeat is not None else None
        if seen is not None and seen.boot == peer.boot and seen.seq >= peer.seq + 2:
            return False
    ack = peer.heartbeat.acks.get(slot)
    if (ack is None or ack.boot != boot) and not peer.acked_us:
        # A newcomer that never heard us (heard from its seq 1): within its start-up grace
        # it takes nothing of ours; after it, only if it never heard us for the whole
        # grace -- our silence towards it and its silence towards us, as above.
        return peer.newcomer_until is not None
    if ack is None or ack.boot != boot or ack.seq < need:
        return False
    sent = peer.acked_sent
    return sent is not None and peer.last_heard - sent <= t.ack_age_max


def ack_expiry(x: PeerRecord, p: PeerRecord, t: Timing) -> float | None:
    """When every lease ``p`` may hold from ``x`` has expired, per x's heartbeats; None
    while x still acks p's current (or an unknown) incarnation.

    x acks exactly the members alive in its view.  Once its heartbeats stop acking p
    (first such heartbeat received at ``since``), x had declared p dead before sending
    it, and p's lease from x ended by ``since + hold``.  How old x's last ack of p was says
    nothing: x may have heard p again since its last heartbeat reached us.  An ack of an
    older incarnation of p supports an incarnation that is gone.
    """
    if x.heartbeat is None:
        return None
    ack = x.heartbeat.acks.get(p.slot)
    if ack is None:
        since = x.noack_since.get(p.slot)
        return None if since is None else since + t.hold
    return NEVER if ack.boot in p.old_boots else None


def takeover_safe(
    p: PeerRecord,
    peers: Iterable[PeerRecord],
    alive: Iterable[PeerRecord],
    *,
    now: float,
    quorum: bool,
    t: Timing,
) -> bool:
    """May this node take buckets ``p`` (not alive) might still serve?  Without quorum:
    once ``p`` has been gone for the hold.  With quorum, any member that left within the
    hold may still lend the other side a lease towards its quorum; and every alive peer
    must have let ``p`` go (:func:`ack_expiry`)."""
    if not quorum:
        return p.departed_at is None or now >= p.departed_at + t.hold
    for y in peers:
        if y.departed_at is not None and now < y.departed_at + t.hold:
            return False
    for x in alive:
        expiry = ack_expiry(x, p, t)
        if x is not p and (expiry is None or now < expiry):
            return False
    return True


def advertised(states: Iterable[KernelState]) -> tuple[int, int]:
    """(live-set mask, held groups) bounding every claim set the kernel may serve.

    A slot's share only grows when the live set shrinks, so the share under the
    intersection of the live sets covers the share under each of them.
    """
    states = list(states)
    live, held = ALL_SLOTS, 0
    for st in states:
        if st.held:
            live &= st.eligible
            held |= st.held
    return (live if held else states[0].eligible), held


def kernel_lease(expiries: Iterable[float | None]) -> float | None:
    """Until when the kernel may take new flows: the earliest lease expiry among the alive
    peers (``NEVER`` if one holds no valid lease of ours); None without alive peers."""
    return min((NEVER if e is None else e for e in expiries), default=None)


def quorum_lease(expiries: Iterable[float | None], members: int) -> float | None:
    """With quorum: until when this node keeps its quorum of time-valid leases (itself plus
    the peers' ``expiries``); no peer can take over before then (two majorities always
    share a member).  None if this node alone is a majority."""
    needed = members // 2  # peers needed besides this node: 1 + needed > members / 2
    if needed == 0:
        return None
    ordered = sorted((NEVER if e is None else e for e in expiries), reverse=True)
    return ordered[needed - 1] if len(ordered) >= needed else NEVER
