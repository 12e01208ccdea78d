"""Membership glue: the layer between the agent's event loop and the sans-I/O core.

Owns: this node's :class:`~multihost.membership.protocol.MembershipCore` (and replacing it
by a new incarnation when the cluster link returns), turning the core's effects into
:class:`Actions` for the agent -- heartbeats to send, log lines, and an ordered list of
kernel operations (:class:`Retarget` the claims through the handover, arm the
:class:`Lease`, :class:`Confirm` an epoch once everything before it is in the kernel) --
the lease-lapse shortcut (keep the bucket sets, lapse the kernel lease), fencing while the
cluster link is down, and the membership part of ``status`` and of the metrics.

Must not: open sockets, schedule timers, read the clock, draw randomness or touch the
kernel: every time and boot id is passed in and the agent carries the actions out.  It never
imports the agent (the loop has one direction: agent -> glue -> core).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from multihost import preflight
from multihost.config import Config
from multihost.membership.config import MembershipConfig
from multihost.membership.effects import ClaimsChanged, Effect, Log, Rejected, Send, ViewChanged
from multihost.membership.protocol import MembershipCore
from multihost.metrics import Snapshot

INF = float("inf")
NO_LEASE = float("-inf")  # a kernel lease that has lapsed


def membership_config(cfg: Config, node: str, key: bytes) -> MembershipConfig:
    """The core's configuration for ``node`` (the same one ``check-config`` checks)."""
    return preflight.membership_config(cfg, node, key)


# ------------------------------------------------------------------ kernel operations
@dataclass(frozen=True)
class Retarget:
    """Serve ``claims`` (per group) from now on, through the handover sets."""

    claims: Mapping[str, frozenset[int]]
    reason: str
    since: float | None = None  # when the view changed (reprogram latency), if it did
    reclassify: bool = False  # re-sort kept buckets (after a lease-only lapse)
    release_all: bool = False  # fenced: give up everything (no handover for new buckets)


@dataclass(frozen=True)
class Lease:
    """Arm the kernel's lease until ``until`` (loop time; ``INF``: no expiry; ``NO_LEASE``:
    lapse now).  Absolute, so a write that waits in a queue never outlives the core's."""

    until: float


@dataclass(frozen=True)
class Confirm:
    """Once every operation before this one is in the kernel: ``applied(epoch)``."""

    epoch: int


KernelOp = Retarget | Lease | Confirm


@dataclass
class Actions:
    """What the agent must do, in this order: send, log, then the kernel operations."""

    sends: list[bytes] = field(default_factory=list)
    logs: list[Log] = field(default_factory=list)
    kernel: list[KernelOp] = field(default_factory=list)

    def extend(self, other: Actions) -> None:
        self.sends += other.sends
        self.logs += other.logs
        self.kernel += other.kernel


class MembershipGlue:
    """The membership layer of one agent.  ``names``: members in configuration order;
    ``link_up``: whether the cluster link carries this node's traffic now (read at each
    claims change; for IPv6 also: duplicate address detection has finished)."""

    def __init__(
        self,
        config: MembershipConfig,
        boot_id: bytes,
        now: float,
        *,
        names: Sequence[str],
        link_up: Callable[[], bool],
    ) -> None:
        self.config = config
        self.core = MembershipCore(config, boot_id, now)
        self._names = tuple(names)
        self._link_up = link_up
        self._view: frozenset[str] = frozenset()
        self._lease_until: float | None = None  # what the kernel lease was last set to
        self._lease_off = False  # the core's claims are blocked by a lease: no new flows
        self._step = config.interval
        self._view_changed_at: float | None = None
        self.view_changes = 0
        self.pauses = 0  # the core's "paused" logs: this node could not run past a deadline
        self.paused_ms = 0.0
        self.fenced = False
        self.fences = 0

    # ------------------------------------------------------------------- inputs
    def received(self, datagrams: Sequence[bytes], now: float) -> Actions:
        effects: list[Effect] = []
        for data in datagrams:
            effects += self.core.receive(data, now)
        return self._run(effects, now)

    def tick(self, now: float) -> Actions:
        return self._run(self.core.tick(now), now)

    def set_draining(self, draining: bool, now: float) -> Actions:
        return self._run(self.core.set_draining(draining, now), now)

    def applied(self, epoch: int, now: float) -> Actions:
        """The kernel serves what was decided up to ``epoch`` (a :class:`Confirm` ran)."""
        return self._run(self.core.applied(epoch, now), now)

    def set_handover(self, draining_flows: bool) -> None:
        self.core.set_handover(draining_flows)

    def link_down(self, reason: str = "cluster link down") -> Actions:
        """The cluster link is down: this node hears nobody and would take every bucket, and
        when the link returns it would answer flows others own.  So: serve nothing, and send
        no heartbeat (the old incarnation would tell the peers that this node is back and
        takes its share).  Also while the link is up but cannot carry this node's replies
        yet (IPv6 duplicate address detection; ``reason`` says why): the peers keep serving
        its share until it rejoins as a new incarnation (:meth:`link_up`)."""
        out = Actions()
        if not self.fenced:
            self.fenced = True
            self.fences += 1
            out.logs.append(Log("warning", "fenced", {"reason": reason}))
            out.kernel.append(Retarget({}, "link down", release_all=True))
        return out

    def link_up(self, boot_id: bytes, now: float) -> Actions:
        """The link is back: rejoin as a new incarnation ``boot_id`` (start-up grace:
        claims only once the peers are heard and their claims known)."""
        if not self.fenced:
            return Actions()
        self.fenced = False
        self.core = MembershipCore(self.config, boot_id, now)
        self._view = frozenset()
        self._lease_off = False
        log = Log("info", "rejoining", {"boot_id": boot_id.hex(), "reason": "cluster link up"})
        out = self._run(self.core.tick(now), now)
        out.logs.insert(0, log)
        return out

    def next_deadline(self) -> float:
        return self.core.next_deadline()

    # ------------------------------------------------------------------ effects
    def _run(self, effects: list[Effect], now: float) -> Actions:
        out = Actions()
        for eff in effects:
            if isinstance(eff, Send):
                if not self.fenced:  # a fenced node is silent: to its peers it is gone
                    out.sends.append(eff.payload)
            elif isinstance(eff, ViewChanged):
                self.view_changes += 1
                self._view_changed_at = now
                old, self._view = self._view, eff.live
                fields = {
                    "live": sorted(eff.live),
                    "joined": sorted(eff.live - old) or None,
                    "left": sorted(old - eff.live) or None,
                }
                out.logs.append(Log("info", "view-changed", fields))
            elif isinstance(eff, ClaimsChanged):
                self._apply(eff, out, now)
            elif isinstance(eff, Log):
                out.logs.append(eff)
                ms = eff.fields.get("ms") if eff.event == "paused" else None
                if isinstance(ms, float):
                    self.pauses += 1
                    self.paused_ms += ms
            elif isinstance(eff, Rejected):
                pass  # counted by the core; the core logs what deserves a log line
        if self._lease_off and self.core.blocked() != {"lease"}:
            # Still claiming nothing, now for another reason (no quorum, draining, ...):
            # no ClaimsChanged comes, so give the kept buckets up (to 'draining') here.
            self._lease_off = False
            out.kernel.append(Retarget({}, "claims blocked"))
        self._sync_lease(now, out)
        return out

    def _apply(self, eff: ClaimsChanged, out: Actions, now: float) -> None:
        groups = self.config.groups
        claims = {g: eff.claims.get(g, frozenset()) for g in groups}
        fenced = self.fenced or not self._link_up()
        if fenced:
            claims = {g: frozenset() for g in claims}  # serving less than claimed is safe
        if not fenced and self.core.blocked() == {"lease"}:
            # A lease lapse (or a wait for fresh acks): take no new flow -- one element in
            # the kernel -- and keep the sets, instead of rewriting every bucket to
            # 'draining' and back when the lease returns a moment later (it usually does:
            # the lapsing peer has crashed and its death follows within an interval).
            self._lease_off = True
            self._sync_lease(now, out)
        else:
            reclassify, self._lease_off = self._lease_off, False
            since, reason = self._view_changed_at, f"epoch {eff.epoch}"
            out.kernel.append(Retarget(claims, reason, since, reclassify))
        self._view_changed_at = None
        out.kernel.append(Confirm(eff.epoch))

    def _sync_lease(self, now: float, out: Actions) -> None:
        """Keep the kernel's lease no later than the core's: shrink or lapse at once; extend
        (to a later deadline only: rewriting the same one changes nothing in the kernel)
        once less than half of what the core allows is left (or less than an interval):
        about one kernel write per interval instead of one per received heartbeat."""
        deadline = NO_LEASE if self._lease_off else self.core.lease_deadline()
        cur = self._lease_until
        if deadline is None:  # no alive peer that could take over: held, no expiry
            if cur != INF:
                out.kernel.append(Lease(INF))
            self._lease_until = INF
        elif deadline <= now:
            if cur is None or cur > now:
                out.kernel.append(Lease(NO_LEASE))
            self._lease_until = NO_LEASE
        elif (
            cur is None
            or cur > deadline
            or (deadline > cur and cur - now < max(self._step, (deadline - now) / 2))
        ):
            out.kernel.append(Lease(deadline))
            self._lease_until = deadline

    # ------------------------------------------------------------------- queries
    def eligible(self) -> frozenset[str]:
        """Members that take a share: alive and not draining (as this node sees them)."""
        members = self.core.members()
        return frozenset(m for m in self._view if not (m in members and members[m].draining))

    def live(self) -> tuple[str, ...]:
        """Members taking a share (alive, not draining), in configuration order."""
        eligible = self.eligible()
        return tuple(n for n in self._names if n in eligible)

    def alive(self) -> tuple[str, ...]:
        return tuple(n for n in self._names if n in self._view)

    def others_draining(self) -> bool:
        """Whether a live member other than this node advertises (in its heartbeats) that it
        still has flows in buckets it gave away."""
        me = self.config.node
        return any(
            name != me and st.state == "alive" and st.handover
            for name, st in self.core.members().items()
        )

    def status(self, now: float, io_counters: Mapping[str, int]) -> dict[str, Any]:
        """The membership part of ``status``; ``io_counters``: the agent's socket and timer
        counters (``send_errors``, ``late_timers``), shown among the counters."""
        members: dict[str, Any] = {}
        for name, m in self.core.members().items():
            members[name] = {
                "state": m.state,
                "slot": m.slot,
                "last_heard_ms": None
                if m.last_heard is None
                else round((now - m.last_heard) * 1000, 1),
                "boot_id": m.boot_id,
                "seq": m.seq,
                "view": sorted(m.view),
                "applied_epoch": m.applied_epoch,
                "draining": m.draining,
                "serving": m.serving,
                "handover": m.handover,
                "lease_ms": None
                if m.lease_expires is None
                else round((m.lease_expires - now) * 1000, 1),
            }
        c = self.core.counters()
        return {
            "epoch": self.core.epoch,
            "applied_epoch": self.core.applied_epoch,
            "draining": self.core.draining,
            "quorum_ok": self.core.quorum_ok,
            "fenced": self.fenced,
            "members": members,
            "counters": {
                "heartbeats_sent": c.sent,
                "heartbeats_received": c.received,
                "heartbeats_accepted": c.accepted,
                "rejected": dict(c.rejected),
                "send_errors": io_counters.get("send_errors", 0),
                "fences": self.fences,
                "view_changes": self.view_changes,
                "late_timers": io_counters.get("late_timers", 0),  # timers > 100 ms late
                "pauses": self.pauses,  # inputs > jitter past the core's deadline
                "paused_ms": round(self.paused_ms, 1),
            },
        }

    def fill_snapshot(self, snap: Snapshot) -> None:
        c = self.core.counters()
        snap.heartbeats_sent = c.sent
        snap.heartbeats_received = c.accepted
        snap.rejected = dict(c.rejected)
        snap.view_changes = self.view_changes
        snap.pauses, snap.paused_seconds = self.pauses, self.paused_ms / 1000
        snap.members_up = {name: m.state == "alive" for name, m in self.core.members().items()}
