"""Per-member state: the one transition table, the mutable peer record, the status snapshot.

Owns: :data:`TRANSITIONS` (every legal ``(state, event) -> state`` move of a peer as seen
by this node; anything else is :class:`IllegalTransitionError`), :class:`PeerRecord` (what
the core remembers about one peer: incarnation, sequence, latest heartbeat, departure time)
and :class:`MemberStatus` (the read-only view for ``status``).

Must not: read clocks, decide ownership or parse datagrams; times are passed in.

States: ``unknown`` (not heard since this node started), ``alive`` (valid heartbeat with our
configuration digest within ``dead_after``), ``dead`` (silent for ``dead_after``),
``mismatch`` (authenticated, but a different configuration digest: not a member).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from multihost.membership.wire import SLOTS, Heartbeat


class MemberState(enum.Enum):
    UNKNOWN = "unknown"
    ALIVE = "alive"
    DEAD = "dead"
    MISMATCH = "mismatch"


class MemberEvent(enum.Enum):
    HEARD = "heard"  # valid heartbeat, same incarnation (or the first one heard)
    RESTARTED = "restarted"  # valid heartbeat from a new incarnation (new boot id)
    HEARD_MISMATCH = "heard-mismatch"  # authenticated, but another configuration digest
    SILENT = "silent"  # dead_after elapsed without a heartbeat


class IllegalTransitionError(RuntimeError):
    """A state change the table does not allow: a bug in the core, never a network event."""


_S = MemberState
_E = MemberEvent

TRANSITIONS: Final[Mapping[tuple[MemberState, MemberEvent], MemberState]] = MappingProxyType(
    {
        (_S.UNKNOWN, _E.HEARD): _S.ALIVE,
        (_S.UNKNOWN, _E.HEARD_MISMATCH): _S.MISMATCH,
        (_S.ALIVE, _E.HEARD): _S.ALIVE,
        (_S.ALIVE, _E.RESTARTED): _S.ALIVE,
        (_S.ALIVE, _E.HEARD_MISMATCH): _S.MISMATCH,
        (_S.ALIVE, _E.SILENT): _S.DEAD,
        (_S.DEAD, _E.HEARD): _S.ALIVE,
        (_S.DEAD, _E.RESTARTED): _S.ALIVE,
        (_S.DEAD, _E.HEARD_MISMATCH): _S.MISMATCH,
        (_S.MISMATCH, _E.HEARD): _S.ALIVE,
        (_S.MISMATCH, _E.RESTARTED): _S.ALIVE,
        (_S.MISMATCH, _E.HEARD_MISMATCH): _S.MISMATCH,
        (_S.MISMATCH, _E.SILENT): _S.DEAD,
    }
)


def next_state(state: MemberState, event: MemberEvent) -> MemberState:
    """The table lookup; raises :class:`IllegalTransitionError` for pairs not in the table."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransitionError(
            f"{event.value} is not allowed in state {state.value}"
        ) from None


OLD_BOOTS_KEPT: Final = 8
#: Logged with ``config-digest-mismatch``: what can differ, and how to find out.
MISMATCH_HINT: Final = (
    "another configuration or bucket table (members, slots, weights, groups, timing, or the"
    " table chosen for them): compare 'multihost check-config' (table, digest) on both nodes"
)


@dataclass
class PeerRecord:
    """What this node knows about one configured peer (mutable; owned by the core)."""

    name: str
    slot: int
    state: MemberState = MemberState.UNKNOWN
    last_heard: float | None = None
    # Whence its silence counts (its death and suspicion): ``last_heard``, moved on past
    # any time this node itself could not run (:meth:`excuse`).
    silent_from: float | None = None
    boot: bytes | None = None
    seq: int = 0
    old_boots: deque[bytes] = field(default_factory=lambda: deque(maxlen=OLD_BOOTS_KEPT))
    heartbeat: Heartbeat | None = None  # latest accepted heartbeat with our digest
    latest: Heartbeat | None = None  # latest authenticated heartbeat, any digest (status)
    mismatch_digest: bytes | None = None  # last mismatching digest logged
    departed_at: float | None = None  # when it last stopped being alive
    min_ack: int = 0  # our seq its acks must reach before its lease counts (after restart)
    acked_sent: float | None = None  # when we sent the heartbeat its latest one acked
    # Newcomer lease (docs/membership.md, "Newcomers"): we heard seq 1 of its current
    # incarnation, so it can neither declare us dead nor end its start-up grace before
    # this (our clock, apply margin deducted).  None: not heard from its first heartbeat.
    newcomer_until: float | None = None
    acked_us: bool = False  # some heartbeat of this incarnation acked our current boot
    # slot -> receipt time of its first heartbeat (since its last ack of that slot) without
    # an ack for that slot.
    noack_since: dict[int, float] = field(default_factory=dict)

    def transition(self, event: MemberEvent) -> tuple[MemberState, MemberState]:
        """Apply ``event`` through the table; returns ``(old, new)``."""
        old = self.state
        self.state = next_state(old, event)
        return old, self.state

    def new_incarnation(self, boot: bytes) -> None:
        if self.boot is not None:
            self.old_boots.append(self.boot)
        self.boot = boot
        self.seq = 0
        self.newcomer_until = None
        self.acked_us = False

    def record_receipt(self, hb: Heartbeat, now: float) -> None:
        self.seq = hb.seq
        self.last_heard = self.silent_from = now

    def excuse(self, start: float, end: float) -> None:
        """This node could not run from ``start`` to ``end`` (a paused process or VM): the
        peer's silence in that time is no evidence, so it does not count."""
        if self.silent_from is not None and self.silent_from < end:
            self.silent_from += end - max(start, self.silent_from)

    def note_digest(self, theirs: bytes, ours: bytes) -> str | None:
        """Track a digest mismatch (then no heartbeat of it counts); returns the event to
        log, once per change: ``config-digest-mismatch`` or ``config-digest-match``."""
        if theirs != ours:
            self.heartbeat = None
            if self.mismatch_digest != theirs:
                self.mismatch_digest = theirs
                return "config-digest-mismatch"
        elif self.mismatch_digest is not None:
            self.mismatch_digest = None
            return "config-digest-match"
        return None

    def accept(
        self, hb: Heartbeat, now: float, slot: int, boot: bytes, sent_at: Mapping[int, float]
    ) -> bool:
        """Record ``hb`` (authenticated, our digest), received at ``now``; ``sent_at`` maps
        our seqs to their send times.  True if its eligibility (drain, suspension) changed."""
        previous, self.heartbeat = self.heartbeat, hb
        self.record_acks(hb, now)
        ack = hb.acks.get(slot)
        ours = ack is not None and ack.boot == boot
        self.acked_sent = sent_at.get(ack.seq) if ack is not None and ours else None
        self.acked_us = self.acked_us or ours
        return previous is not None and (
            previous.draining != hb.draining or previous.suspended_groups != hb.suspended_groups
        )

    def record_acks(self, hb: Heartbeat, now: float) -> None:
        """Track, per slot, since when its heartbeats (with our digest) stopped acking it."""
        for s in range(SLOTS):
            if s in hb.acks:
                self.noack_since.pop(s, None)
            else:
                self.noack_since.setdefault(s, now)


@dataclass(frozen=True)
class MemberStatus:
    """Read-only status of one member as seen by this node (for ``multihost status``)."""

    name: str
    slot: int
    state: str
    last_heard: float | None
    boot_id: str | None
    seq: int
    view: frozenset[str]
    applied_epoch: int | None
    draining: bool
    lease_expires: float | None  # peers: until when our lease from it runs
    serving: bool = False  # may still serve buckets (drained: draining and not serving)
    handover: bool = False  # still has flows in buckets it gave away (docs/handover.md)
    suspended: bool = False  # takes no share in some group (a peer cannot hear it)
    suspect: bool = False  # silent for longer than interval + jitter (crashed or cut off)


def peer_status(
    p: PeerRecord, members: Mapping[str, int], lease_expires: float | None, suspect: bool = False
) -> MemberStatus:
    """The status snapshot of ``p`` (``members`` maps names to slots, to name its view)."""
    hb = p.latest
    view = frozenset(n for n, s in members.items() if hb and hb.view >> s & 1)
    return MemberStatus(
        name=p.name,
        slot=p.slot,
        state=p.state.value,
        last_heard=p.last_heard,
        boot_id=p.boot.hex() if p.boot else None,
        seq=p.seq,
        view=view,
        applied_epoch=hb.applied_epoch if hb else None,
        draining=bool(hb and hb.draining),
        lease_expires=lease_expires,
        serving=bool(hb and hb.held_groups),
        suspended=bool(hb and hb.suspended_groups),
        handover=bool(hb and hb.handover),
        suspect=suspect,
    )


def statuses(
    me: MemberStatus,
    peers: Iterable[PeerRecord],
    members: Mapping[str, int],
    expiry: Callable[[PeerRecord], float | None],
    suspects: frozenset[str],
) -> dict[str, MemberStatus]:
    """Every member's status: this node's (``me``) and each peer's (``expiry``: until when
    our lease from an alive peer runs; ``suspects``: the peers suspect now)."""
    out = {me.name: me}
    for p in peers:
        alive = p.state is MemberState.ALIVE
        out[p.name] = peer_status(p, members, expiry(p) if alive else None, p.name in suspects)
    return out
