"""The sans-I/O membership core: heartbeats and ticks in; sends, views and claims out.

Owns: :class:`MembershipCore`, the state machine deciding who is alive and which buckets
this node may serve at every instant.  Inputs are ``receive(datagram, now)``,
``tick(now)``, ``set_draining(flag, now)`` and ``applied(epoch, now)`` (the agent's
confirmation that the kernel serves the claims of ``epoch``); ``next_deadline()`` says when
to tick next.  Outputs are :mod:`.effects`.

Safety rules (``docs/membership.md``; the group rule is :mod:`.claims`, the lease and
suspicion arithmetic :mod:`.leases`), re-evaluated from scratch on every input: a group's
claims are this node's share under its eligible live set, minus every bucket an alive
peer's latest heartbeat says it may serve; empty unless every alive peer of the group
gives a *fresh lease* or is *suspect* (with quorum: a majority's leases stand in for the
others' time validity), and while draining, suspended, without quorum or in the start-up
grace.  A departed peer's buckets are not taken before ``takeover_hold``; heartbeats
advertise a bound on every claim set the kernel may still serve.

Must not: open sockets, read clocks, sleep or draw randomness (the boot id is passed in).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Final

import numpy as np

from multihost.membership.admission import RefusalLogs, Refused, admit
from multihost.membership.claims import ClaimInputs, compute, group_inputs
from multihost.membership.config import MembershipConfig
from multihost.membership.effects import (
    REJECT_REASONS,
    ClaimsChanged,
    Counters,
    Effect,
    Log,
    Rejected,
    Send,
    ViewChanged,
)
from multihost.membership.leasebook import LeaseBook
from multihost.membership.leases import (
    KernelState,
    Timing,
    ack_expiry,
    advertised,
    newcomer_until,
    paused,
    takeover_safe,
)
from multihost.membership.outgoing import outgoing
from multihost.membership.ownership import (
    BoolArray,
    GroupLayout,
    claims_bound,
    empty,
    layout_groups,
    mask_of,
)
from multihost.membership.state import (
    MISMATCH_HINT,
    IllegalTransitionError,
    MemberEvent,
    MemberState,
    MemberStatus,
    PeerRecord,
    statuses,
)
from multihost.membership.wire import BOOT_ID_SIZE, encode

ALIVE: Final = MemberState.ALIVE
INF: Final = float("inf")
# Repeats (min_send_gap apart) of the heartbeat announcing a view without a member we
# declared dead: a peer serving what we now take may exempt us as suspect until it sees
# that view (docs/membership.md, "Fault patterns"); one lost datagram must not hide it.
DEATH_ANNOUNCEMENTS: Final = 5  # 6 sends over 5/8 interval: all lost at 40 % loss: 0.4 %


class MembershipCore:
    """Membership and claims of one node.  Pure: every time is passed in by the caller."""

    def __init__(self, config: MembershipConfig, boot_id: bytes, now: float) -> None:
        if len(boot_id) != BOOT_ID_SIZE:
            raise ValueError(f"boot id must be {BOOT_ID_SIZE} random bytes")
        self.config = config
        self._boot = bytes(boot_id)
        self._me = config.node
        self._slot = config.slot
        self._digest = config.wire_digest
        self._da = config.dead_after
        self._hold = config.takeover_hold
        self._timing = Timing(
            config.dead_after,
            config.takeover_hold,
            config.lease_margin,
            config.interval,
            config.jitter,
        )
        self._now = now
        self._due: float | None = None  # the last next_deadline() handed out
        self._groups = layout_groups(config.groups, config.members)
        self._my_groups = tuple(g for g in self._groups if self._me in g.members)
        self._peers = {n: PeerRecord(n, s) for n, s in config.members.items() if n != self._me}
        mine = self._my_groups  # per group its other members (sorted), per peer its groups
        self._group_peers = {
            g.name: tuple(self._peers[n] for n in sorted(g.members) if n != self._me) for g in mine
        }
        self._peer_groups = {n: tuple(g.name for g in mine if n in g.members) for n in self._peers}
        self._leases = LeaseBook(self._peers, self._slot, self._boot, self._timing)
        self._seq = 0
        self._sent_at: dict[int, float] = {}
        self._next_send = now
        self._last_send = -INF
        self._draining = False
        self._handover = False
        self._ineligible_sent = -INF  # last heartbeat saying we take no share somewhere
        # Per group: peers must ack at least this seq of ours (bumped when we become
        # eligible again after draining or a suspension) before we claim anything in it.
        self._fresh = {g.name: 1 for g in self._my_groups}
        self._suspended: dict[str, bool] = {g.name: False for g in self._my_groups}
        self._view: frozenset[str] = frozenset({self._me})
        self._table = config.ownership_table
        self._claims = {g.name: empty(self._table.buckets) for g in self._my_groups}
        self._claim_keys: dict[str, ClaimInputs] = {}
        self._epoch = 0
        self._applied_epoch = 0
        self._states: list[KernelState] = [KernelState(0, 0, 0)]  # [0] is confirmed
        self._quorum_ok = not config.quorum or len(config.members) == 1
        self._grace_until = now + self._da + self._hold
        self._refusals = RefusalLogs(self._boot)
        self._announce = 0  # early heartbeats still to send after a member-dead
        self._sent = 0
        self._received = 0
        self._accepted = 0
        self._rejected: Counter[str] = Counter()

    # ------------------------------------------------------------------ inputs

    def receive(self, datagram: bytes, now: float) -> list[Effect]:
        """Handle one datagram from the cluster group."""
        out: list[Effect] = []
        now = self._clock(now, out)
        self._received += 1
        self._accept(datagram, now, out)
        self._advance(now, out)
        return out

    def tick(self, now: float) -> list[Effect]:
        """Handle the passage of time (call at ``next_deadline()``, or any time)."""
        out: list[Effect] = []
        self._advance(self._clock(now, out), out)
        return out

    def set_draining(self, draining: bool, now: float) -> list[Effect]:
        """Draining: stay a member but serve nothing; peers take the buckets over."""
        out: list[Effect] = []
        now = self._clock(now, out)
        if draining != self._draining:
            self._draining = draining
            if not draining:
                self._fresh = dict.fromkeys(self._fresh, self._seq + 1)
            out.append(Log("info", "draining" if draining else "undraining", {}))
            self._soon(now)
        self._advance(now, out)
        return out

    def set_handover(self, draining_flows: bool) -> None:
        """Advertise (from the next heartbeat on) whether given-away buckets still drain."""
        self._handover = draining_flows

    def applied(self, epoch: int, now: float) -> list[Effect]:
        """The kernel now serves exactly the claims of ``epoch`` (from ClaimsChanged)."""
        out: list[Effect] = []
        now = self._clock(now, out)
        if epoch > self._epoch:
            out.append(Log("error", "applied-unknown-epoch", {"epoch": epoch}))
        elif epoch > self._applied_epoch:
            before = self._advertised()
            self._states = [st for st in self._states if st.epoch >= epoch]
            self._applied_epoch = epoch
            if self._advertised() != before:
                self._soon(now)
        self._advance(now, out)
        return out

    def next_deadline(self) -> float:
        """The next time at which ``tick`` changes something (absent new input).  A caller
        that asks schedules by it: an input more than ``jitter`` after it means this node
        could not run meanwhile (:meth:`_clock`)."""
        now, da, hold, best = self._now, self._da, self._hold, self._next_send
        later: list[float | None] = [self._grace_until]  # count only if after now
        alive = [p for p in self._peers.values() if p.state is ALIVE]
        for p in self._peers.values():
            state, heard = p.state, p.silent_from
            if heard is not None and (state is ALIVE or state is MemberState.MISMATCH):
                best = min(best, heard + da)
            if p.departed_at is not None:
                later.append(p.departed_at + hold)
            if state is ALIVE:
                later.append(self._leases.expiry(p))
                later.append(heard and heard + self._timing.suspect_after)
            elif self.config.quorum:
                later += (ack_expiry(x, p, self._timing) for x in alive)
        for t in later:
            if t is not None and now < t < best:
                best = t
        self._due = best
        return best

    # ----------------------------------------------------------- introspection

    @property
    def boot_id(self) -> bytes:
        return self._boot

    @property
    def view(self) -> frozenset[str]:
        return self._view

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def quorum_ok(self) -> bool:
        return self._quorum_ok

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def applied_epoch(self) -> int:
        return self._applied_epoch

    @property
    def claims(self) -> Mapping[str, BoolArray]:
        """Current claims (read-only masks); the kernel may lag until ``applied``."""
        return dict(self._claims)

    def lease_deadline(self) -> float | None:
        """The kernel's dead-man switch: the kernel may take new flows until then (None:
        no alive peer could take over); see ``dataplane/rulesettables.py``, ``lease``."""
        alive = [p for p in self._peers.values() if p.state is ALIVE]
        quorum_of = len(self.config.members) if self.config.quorum else None
        return self._leases.kernel_deadline(alive, quorum_of)

    @property
    def suspects(self) -> frozenset[str]:
        """Alive peers not heard for longer than ``interval + jitter`` (crashed or cut off)."""
        return self._leases.suspects

    def blocked(self) -> frozenset[str]:
        """Why this node's groups claim nothing (e.g. ``lease``), one reason per group."""
        return frozenset(k.blocked for k in self._claim_keys.values())

    def counters(self) -> Counters:
        rejected = {r: self._rejected[r] for r in REJECT_REASONS}
        return Counters(self._sent, self._received, self._accepted, rejected)

    def members(self) -> dict[str, MemberStatus]:
        """Status of every configured member as seen by this node (itself included)."""
        who = (self._me, self._slot, ALIVE.value, self._now, self._boot.hex(), self._seq)
        where = (self._view, self._applied_epoch, self._draining, None)
        serving, suspended = self._advertised()[1] != 0, any(self._suspended.values())
        me = MemberStatus(*who, *where, serving=serving, suspended=suspended)
        peers, leases = self._peers.values(), self._leases
        return statuses(me, peers, self.config.members, leases.expiry, leases.suspects)

    # ------------------------------------------------------------- receiving

    def _clock(self, now: float, out: list[Effect]) -> float:
        """Time never runs backwards in the core; a late call means a pause (:func:`paused`)."""
        out += paused(self._peers.values(), self._due, now, self._timing.jitter)
        self._due, self._now = None, max(self._now, now)
        return self._now

    def _reject(self, reason: str, sender: str | None, out: list[Effect]) -> None:
        self._rejected[reason] += 1
        out.append(Rejected(reason, sender))

    def _accept(self, datagram: bytes, now: float, out: list[Effect]) -> None:
        cfg = self.config
        verdict = admit(datagram, cfg.key, cfg.cluster, self._me, self._peers)
        if isinstance(verdict, Refused):
            out += self._refusals.logs(verdict)
            self._reject(verdict.reason, verdict.sender, out)
            return
        hb, peer = verdict.hb, verdict.peer
        restarted = verdict.new_boot and peer.boot is not None
        if verdict.new_boot:
            peer.new_incarnation(hb.boot)
            young = now > self._ineligible_sent + 2 * self._timing.jitter  # A4: never heard it
            if hb.seq == 1 and hb.digest == self._digest and young:
                peer.newcomer_until = newcomer_until(now, self._timing)
        peer.record_receipt(hb, now)
        peer.latest = hb
        change = peer.note_digest(hb.digest, self._digest)
        if change == "config-digest-match":
            out.append(Log("info", change, {"member": peer.name}))
        elif change is not None:
            fields = {"member": peer.name, "theirs": hb.digest.hex(), "hint": MISMATCH_HINT}
            out.append(Log("error", change, fields))
        if hb.digest != self._digest:
            self._reject("digest-mismatch", peer.name, out)
            event = MemberEvent.HEARD_MISMATCH
        else:
            self._accepted += 1
            if peer.accept(hb, now, self._slot, self._boot, self._sent_at):
                self._soon(now)  # its eligibility changed: it needs our fresh ack
            event = MemberEvent.RESTARTED if restarted else MemberEvent.HEARD
        self._leases.refresh(peer, self._sent_at)  # its heartbeat changed (or was dropped)
        old, new = self._transition(peer, event, out)
        if restarted:
            peer.min_ack = self._seq + 1
            out.append(Log("info", "member-restarted", {"member": peer.name}))
            self._soon(now)
        if old is ALIVE and new is not ALIVE:
            peer.departed_at = now
        if new is ALIVE and old is not ALIVE:
            out.append(Log("info", "member-alive", {"member": peer.name, "was": old.value}))
            self._soon(now)

    def _transition(
        self, peer: PeerRecord, event: MemberEvent, out: list[Effect]
    ) -> tuple[MemberState, MemberState]:
        try:
            return peer.transition(event)
        except IllegalTransitionError as exc:
            if self.config.strict_transitions:
                raise
            out.append(Log("error", "illegal-transition", {"member": peer.name, "error": str(exc)}))
            return peer.state, peer.state

    # --------------------------------------------------------------- advancing

    def _soon(self, now: float) -> None:
        """Send the next heartbeat early (rate-limited by ``min_send_gap``)."""
        self._next_send = min(self._next_send, max(now, self._last_send + self.config.min_send_gap))

    def _advance(self, now: float, out: list[Effect]) -> None:
        for p in self._peers.values():
            silent = p.silent_from is not None and now >= p.silent_from + self._da
            if silent and p.state in (ALIVE, MemberState.MISMATCH):
                old, _ = self._transition(p, MemberEvent.SILENT, out)
                if old is ALIVE:
                    p.departed_at = now
                    out.append(Log("warning", "member-dead", {"member": p.name}))
                    self._announce = DEATH_ANNOUNCEMENTS
        view = frozenset({self._me, *(p.name for p in self._peers.values() if p.state is ALIVE)})
        if view != self._view:
            self._view = view
            out.append(ViewChanged(view))
            self._soon(now)
        self._update_quorum(now, out)
        self._update_claims(now, out)
        if now >= self._next_send:
            self._send(now, out)

    def _update_quorum(self, now: float, out: list[Effect]) -> None:
        if self.config.quorum:
            ok = self._leases.quorum(self._peers.values(), now, len(self.config.members))
            if ok != self._quorum_ok:
                self._quorum_ok = ok
                out.append(
                    Log("info", "quorum-gained", {}) if ok else Log("warning", "quorum-lost", {})
                )

    def _update_claims(self, now: float, out: list[Effect]) -> None:
        alive = [p for p in self._peers.values() if p.state is ALIVE]
        leases = self._leases
        out += leases.update(alive, now, self._need_all)
        # Suspended: an alive peer of g cannot hear us (a newcomer's view may lack us).
        views = [
            (p.name, p.heartbeat.view)
            for p in alive
            if p.heartbeat and not leases.unheard_ok(p, now)
        ]
        for g in self._my_groups:
            hb_views = (view for name, view in views if name in g.members)
            suspended = any(not view >> self._slot & 1 for view in hb_views)
            if self._suspended[g.name] != suspended:
                self._suspended[g.name] = suspended
                out.append(Log("info", "suspended" if suspended else "resumed", {"group": g.name}))
                if not suspended:
                    self._fresh[g.name] = self._seq + 1
                self._soon(now)
        t = self._timing
        unsafe = {
            p.name
            for p in self._peers.values()
            if p.state is not ALIVE
            and not takeover_safe(
                p, self._peers.values(), alive, now=now, quorum=self.config.quorum, t=t
            )
        }
        changed = keys_changed = False
        keys: dict[str, ClaimInputs] = {}
        for g in self._my_groups:
            keys[g.name] = key = self._group_key(g, alive, now, unsafe)
            if key == self._claim_keys.get(g.name):
                continue
            keys_changed = True
            self._claim_keys[g.name] = key
            new = self._compute(g, key)
            if not np.array_equal(new, self._claims[g.name]):
                self._claims[g.name] = new
                changed = True
        if not keys_changed:
            return
        held, live = claims_bound(
            (g, keys[g.name].live) for g in self._my_groups if self._claims[g.name].any()
        )
        before = self._advertised()
        if changed:
            self._epoch += 1
            self._states.append(KernelState(self._epoch, live, held))
            out.append(ClaimsChanged(self._epoch, dict(self._claims)))
        else:  # same claims, new live sets: a bound as valid as the old one, maybe tighter
            self._states[-1] = KernelState(self._states[-1].epoch, live, held)
        if self._advertised() != before:
            self._soon(now)

    def _group_key(
        self, g: GroupLayout, alive: list[PeerRecord], now: float, unsafe: set[str]
    ) -> ClaimInputs:
        def leased(p: PeerRecord) -> bool:
            need = max(self._fresh[g.name], p.min_ack)
            hb = p.heartbeat
            assert hb is not None
            ack = hb.acks.get(self._slot)
            fresh = ack is not None and ack.boot == self._boot and ack.seq >= need
            if fresh and (self._leases.was_ok(p) or self.config.quorum):
                return True  # quorum: a majority's time-valid leases stand in for p's
            return self._leases.newcomer(p, now) or self._leases.exempt(p, need, now)

        return group_inputs(
            g,
            self._slot,
            self._group_peers[g.name],
            ineligible=self._draining or self._suspended[g.name],
            quorum_ok=self._quorum_ok,
            in_grace=now < self._grace_until,
            leased=leased,
            unsafe=unsafe,
        )

    def _compute(self, g: GroupLayout, key: ClaimInputs) -> BoolArray:
        return compute(self._table, self._slot, key, self._claims[g.name])

    # ---------------------------------------------------------- leases, holds

    def _need_all(self, p: PeerRecord) -> int:
        """The fresh seq ``p`` must ack in every group of ours it belongs to."""
        fresh = self._fresh
        return max([p.min_ack, *(fresh[g] for g in self._peer_groups[p.name])])

    # ----------------------------------------------------------------- sending

    def _advertised(self) -> tuple[int, int]:
        return advertised(self._states)

    def _send(self, now: float, out: list[Effect]) -> None:
        self._seq += 1
        hb = outgoing(
            self.config,
            self._boot,
            seq=self._seq,
            view=self._view,
            advert=self._advertised(),
            applied_epoch=self._applied_epoch,
            suspended_groups=mask_of(g.index for g in self._my_groups if self._suspended[g.name]),
            draining=self._draining,
            handover=self._handover,
            peers=self._peers.values(),
        )
        out.append(Send(encode(hb, self.config.key)))
        self._sent += 1
        self._sent_at[self._seq] = now
        if self._seq == 1:  # the grace runs from seq 1 on: what a newcomer lease counts on
            self._grace_until = max(self._grace_until, now + self._da + self._hold)
        horizon = now - (self._da + self._hold + self._timing.ack_age_max)
        for seq in [s for s, t in self._sent_at.items() if t < horizon]:
            del self._sent_at[seq]
        if self._draining or any(self._suspended.values()):
            # A newcomer that hears this may take our share (ineligible: no death needed),
            # so its newcomer lease is void: claiming again will need its fresh ack.
            self._ineligible_sent = now
            for p in self._peers.values():
                p.newcomer_until = None
        for p in self._peers.values():  # _sent_at (or a newcomer lease) changed
            self._leases.refresh(p, self._sent_at)
        self._last_send = now
        self._next_send = now + self.config.interval
        if self._announce:  # the new view, repeated: a lossy link must not hide it
            self._announce -= 1
            self._soon(now)
