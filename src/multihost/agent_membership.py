"""Wires the sans-I/O membership core into the agent's event loop.

Owns: the multicast socket's reader, the core's timer (``loop.call_at`` the core's next
deadline), and carrying out the core's effects — send heartbeats, log, count, and on
``ClaimsChanged`` reprogram the kernel through the agent's handover (new buckets arrive
through ``incoming`` while another live member advertises draining flows, else straight to
``owned``) and confirm with ``core.applied(epoch)``.

Must not: decide membership or ownership (the core does) or talk to nft directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from multihost import preflight
from multihost.mcast import open_multicast
from multihost.membership.config import MembershipConfig
from multihost.membership.effects import ClaimsChanged, Effect, Log, Rejected, Send, ViewChanged
from multihost.membership.protocol import MembershipCore
from multihost.metrics import Snapshot

if TYPE_CHECKING:
    from multihost.agent import Agent

MAX_DATAGRAMS_PER_WAKEUP = 64
LATE_WARNING = 0.1  # s: a membership timer this late is logged (evidence of stalls)
#: How often the cluster interface's operational state is checked (seconds).
LINK_CHECK_PERIOD = 0.05


def link_up(interface: str) -> bool:
    """Whether the interface can carry traffic (sysfs operstate; the netns's own /sys)."""
    try:
        with open(f"/sys/class/net/{interface}/operstate") as f:
            state = f.read().strip()
    except OSError:
        return False
    return state in ("up", "unknown")


def membership_config(agent: Agent, key: bytes) -> MembershipConfig:
    return preflight.membership_config(agent.cfg, agent.node.name, key)


class MembershipDriver:
    def __init__(self, agent: Agent, key: bytes) -> None:
        self.agent = agent
        self.core = MembershipCore(membership_config(agent, key), agent.boot_id, time.monotonic())
        self.sock: socket.socket | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._view: frozenset[str] = frozenset()
        # the kernel's lease: its expiry (loop time; inf: no expiry), None: unknown
        self._lease_until: float | None = None
        self._lease_off = False  # the core's claims are blocked by a lease: no new flows
        self._step = agent.cfg.cluster.heartbeat_interval_ms / 1000
        self.view_changes = 0
        self.late_timers = 0
        self.send_errors = 0
        self._view_changed_at: float | None = None
        self._key = key
        self.fenced = False
        self.fences = 0
        self._link_timer: asyncio.TimerHandle | None = None
        c = agent.cfg.cluster
        self._dest = (str(c.multicast_group), c.port)

    # ------------------------------------------------------------------ lifecycle
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        addr = preflight.heartbeat_address(self.agent.cfg, self.agent.node.name)
        c = self.agent.cfg.cluster
        self.sock = open_multicast(c.multicast_group, c.port, c.interface, addr)
        loop.add_reader(self.sock.fileno(), self._on_readable)
        self._run(self.core.tick(loop.time()))
        self._check_link()

    # ------------------------------------------------------------- link fencing
    def _check_link(self) -> None:
        """A node whose own link is down hears nobody and would take every bucket; when the
        link returns it would answer flows others own.  So: link down -> serve nothing;
        link up again -> rejoin as a new incarnation (start-up grace: claims only once the
        peers are heard and their claims known)."""
        assert self.loop is not None
        up = link_up(self.agent.cfg.cluster.interface)
        if not up and not self.fenced:
            self.fenced = True
            self.fences += 1
            self.agent.log("fenced", level="warning", reason="cluster link down")
            for g in self.agent.handover.groups:
                self.agent.handover.release_all(g)
            self.agent.sync_kernel(None, "link down")
        elif up and self.fenced:
            self.fenced = False
            self._restart_core()
        self._link_timer = self.loop.call_later(LINK_CHECK_PERIOD, self._check_link)

    def _restart_core(self) -> None:
        assert self.loop is not None
        self.agent.boot_id = os.urandom(8)
        self.core = MembershipCore(
            membership_config(self.agent, self._key), self.agent.boot_id, self.loop.time()
        )
        self._view = frozenset()
        self._lease_off = False
        self.agent.log("rejoining", boot_id=self.agent.boot_id.hex(), reason="cluster link up")
        self._run(self.core.tick(self.loop.time()))

    def close(self) -> None:
        if self._link_timer is not None:
            self._link_timer.cancel()
            self._link_timer = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.sock is not None:
            if self.loop is not None:
                with contextlib.suppress(Exception):
                    self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    # ------------------------------------------------------------------- inputs
    def _on_readable(self) -> None:
        assert self.sock is not None and self.loop is not None
        effects: list[Effect] = []
        for _ in range(MAX_DATAGRAMS_PER_WAKEUP):
            try:
                data = self.sock.recv(2048)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.agent.log("heartbeat-recv-failed", level="warning", error=str(e))
                break
            effects += self.core.receive(data, self.loop.time())
        self._run(effects)

    def _on_timer(self) -> None:
        assert self.loop is not None
        assert self._timer is not None  # set by _schedule, the only caller of call_at
        late = self.loop.time() - self._timer.when()
        self._timer = None
        if late > LATE_WARNING:  # the loop (or the whole process) was held up
            self.late_timers += 1
            self.agent.log("loop-late", level="warning", late_ms=round(late * 1000, 1))
        if self.sock is not None:  # heartbeats queued meanwhile first: a late timer must
            self._on_readable()  # not declare dead a peer whose heartbeat is waiting
        self._run(self.core.tick(self.loop.time()))

    def set_draining(self, draining: bool) -> None:
        assert self.loop is not None
        self._run(self.core.set_draining(draining, self.loop.time()))

    # ------------------------------------------------------------------ effects
    def _run(self, effects: list[Effect]) -> None:
        assert self.loop is not None
        pending = list(effects)
        while pending:
            eff = pending.pop(0)
            if isinstance(eff, Send):
                self._send(eff.payload)
            elif isinstance(eff, ViewChanged):
                self.view_changes += 1
                self._view_changed_at = time.monotonic()
                old, self._view = self._view, eff.live
                self.agent.log(
                    "view-changed",
                    live=sorted(eff.live),
                    joined=sorted(eff.live - old) or None,
                    left=sorted(old - eff.live) or None,
                )
            elif isinstance(eff, ClaimsChanged):
                pending += self._apply(eff)
            elif isinstance(eff, Log):
                self.agent.log(eff.event, level=eff.level, **dict(eff.fields))
            elif isinstance(eff, Rejected):
                pass  # counted by the core; the core logs what deserves a log line
        if self._lease_off and self.core.blocked() != {"lease"}:
            # Still claiming nothing, now for another reason (no quorum, draining, ...):
            # no ClaimsChanged comes, so give the kept buckets up (to 'draining') here.
            self._lease_off = False
            empty = {g: frozenset[int]() for g in self.agent.handover.groups}
            self.agent.retarget(empty, self.others_draining(), None, "claims blocked")
        self._sync_lease()
        self._schedule()

    def _send(self, payload: bytes) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendto(payload, self._dest)
        except OSError:
            self.send_errors += 1  # link down, buffer full: the next heartbeat retries

    def eligible(self) -> frozenset[str]:
        """Members that take a share: alive and not draining (as this node sees them)."""
        members = self.core.members()
        return frozenset(m for m in self._view if not (m in members and members[m].draining))

    def _apply(self, eff: ClaimsChanged) -> list[Effect]:
        assert self.loop is not None
        claims = {g: eff.claims.get(g, frozenset()) for g in self.agent.handover.groups}
        fenced = self.fenced or not link_up(self.agent.cfg.cluster.interface)
        if fenced:
            claims = {g: frozenset() for g in claims}  # serving less than claimed is safe
        if not fenced and self.core.blocked() == {"lease"}:
            # A lease lapse (or a wait for fresh acks): take no new flow -- one element in
            # the kernel -- and keep the sets, instead of rewriting every bucket to
            # 'draining' and back when the lease returns a moment later (it usually does:
            # the lapsing peer has crashed and its death follows within an interval).
            self._lease_off = True
            self._sync_lease()
        else:
            reclassify, self._lease_off = self._lease_off, False
            self.agent.retarget(
                claims,
                self.others_draining(),
                self._view_changed_at,
                f"epoch {eff.epoch}",
                reclassify=reclassify,
            )
        self._view_changed_at = None
        return self.core.applied(eff.epoch, self.loop.time())

    def _sync_lease(self) -> None:
        """Keep the kernel's lease no later than the core's: shrink or lapse at once, extend
        when it moved on by an interval or is within an interval of expiring."""
        assert self.loop is not None
        now = self.loop.time()
        deadline = float("-inf") if self._lease_off else self.core.lease_deadline()
        cur = self._lease_until
        if deadline is None:  # no alive peer that could take over: held, no expiry
            if cur != float("inf"):
                self.agent.set_kernel_lease(None)
            self._lease_until = float("inf")
        elif deadline <= now:
            if cur is None or cur > now:
                self.agent.set_kernel_lease(0)
            self._lease_until = float("-inf")
        elif (
            cur is None or cur > deadline or deadline - cur >= self._step or cur - now < self._step
        ):
            self.agent.set_kernel_lease(int((deadline - now) * 1000))
            self._lease_until = deadline

    def _schedule(self) -> None:
        assert self.loop is not None
        deadline = self.core.next_deadline()
        if self._timer is not None:
            if abs(self._timer.when() - deadline) < 1e-4:
                return
            self._timer.cancel()
        self._timer = self.loop.call_at(deadline, self._on_timer)

    # ------------------------------------------------------------------- queries
    def live(self) -> tuple[str, ...]:
        """Members taking a share (alive, not draining), in configuration order."""
        eligible = self.eligible()
        return tuple(n.name for n in self.agent.cfg.nodes if n.name in eligible)

    def alive(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.agent.cfg.nodes if n.name in self._view)

    def others_draining(self) -> bool:
        """Whether a live member other than this node advertises (in its heartbeats) that it
        still has flows in buckets it gave away."""
        me = self.agent.node.name
        return any(
            name != me and st.state == "alive" and st.handover
            for name, st in self.core.members().items()
        )

    def set_handover(self, draining_flows: bool) -> None:
        self.core.set_handover(draining_flows)

    def status(self) -> dict[str, Any]:
        now = self.loop.time() if self.loop is not None else time.monotonic()
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
                "send_errors": self.send_errors,
                "fences": self.fences,
                "view_changes": self.view_changes,
                "late_timers": self.late_timers,  # membership timers > 100 ms late (stalls)
            },
        }

    def fill_snapshot(self, snap: Snapshot) -> None:
        c = self.core.counters()
        snap.heartbeats_sent = c.sent
        snap.heartbeats_received = c.accepted
        snap.rejected = dict(c.rejected)
        snap.view_changes = self.view_changes
        snap.members_up = {name: m.state == "alive" for name, m in self.core.members().items()}
