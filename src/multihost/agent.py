"""The agent: the one event loop that owns this node's share of the traffic IPs.

Owns: wiring sockets and the clock to the pure cores and their effects to the kernel —
host setup (traffic IPs on ``lo``, ARP sysctls, multicast membership), the nft data plane
(an owner-flagged table held through this process's persistent nft context, so the kernel
drops it and the node stops answering if this process dies), the ARP responder, the
membership socket and core (or manual mode, where ``set-live`` requests decide the live
set), the control socket, metrics, systemd notifications and signals (SIGTERM/SIGINT: clean
stop that releases everything; SIGHUP: reload the configuration if it is valid).

Must not: decide ownership itself (``ownership``/``membership`` do) or render nft rules
(``dataplane.ruleset`` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from multihost import sdnotify
from multihost.agent_membership import MembershipDriver
from multihost.assignment import merge_ranges
from multihost.config import Config, ConfigError, read_key
from multihost.control import serve
from multihost.dataplane import backend as dataplanes
from multihost.dataplane.conntrack import GroupFlows, buckets_in_use
from multihost.dataplane.hostsetup import HostSetup
from multihost.dataplane.responder import Responder
from multihost.dataplane.ruleset import GroupBuckets
from multihost.handover import Handover
from multihost.logfmt import EventLog
from multihost.macaddr import format_mac, multicast_mac
from multihost.metrics import Metrics, Snapshot
from multihost.ownership import ownership, release_step, targets
from multihost.preflight import load, ruleset_spec
from multihost.simulation import fraction_text

Claims = dict[str, frozenset[int]]
#: Housekeeping ticks (seconds) between reads of the nft counters (status, metrics).
COUNTER_EVERY = 5
#: Manual mode on the XDP backend: the kernel lease, renewed every housekeeping tick.  The
#: XDP program outlives a killed agent (nft's owned table does not), so without a lease a
#: dead manual agent's node would go on taking new flows.
MANUAL_XDP_LEASE_MS = 3000


class Agent:
    def __init__(
        self,
        cfg: Config,
        node: str,
        *,
        manual: bool = False,
        control_socket: Path | None = None,
        log: EventLog | None = None,
    ) -> None:
        self.cfg = cfg
        self.node = cfg.node(node)
        self.manual = manual
        self.control_path = control_socket or cfg.cluster.control_socket
        self.log = log or EventLog(node=node)
        self.boot_id = os.urandom(8)
        self.started = time.monotonic()
        self.handover = Handover([g.name for g in cfg.groups], cfg.cluster.max_drain_ms / 1000)
        self.applied: dict[str, GroupBuckets] = {g.name: GroupBuckets() for g in cfg.groups}
        self.manual_live: tuple[str, ...] = ()
        self.lease_held = True  # as installed: held without expiry
        self.lease_updates = 0
        self.last_update_ms: float | None = None
        self.flows_draining: int | None = 0  # flows left in draining buckets (last look)
        self.updates = 0
        self.metrics = Metrics(node)
        self.snapshot = Snapshot()
        self._stop = asyncio.Event()
        self._cleanups: list[tuple[str, Callable[[], Any]]] = []
        self.host: HostSetup | None = None
        self.dataplane: dataplanes.Backend | None = None
        self.responder: Responder | None = None
        self.membership: MembershipDriver | None = None
        self._packets: dict[str, dict[str, int]] = {}

    # ----------------------------------------------------------------- lifecycle
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        try:
            await self._start()
            self.log(
                "started",
                boot_id=self.boot_id.hex(),
                mode=self.mode,
                vip_mac=format_mac(multicast_mac(self.cfg.cluster.multicast_group)),
            )
            sdnotify.notify("READY=1\nSTATUS=serving")
            await self._stop.wait()
            self.log("stopping", reason="signal")
            return 0
        finally:
            await self._shutdown()

    @property
    def mode(self) -> str:
        return "manual" if self.manual else "membership"

    def stop(self) -> None:
        self._stop.set()

    def _undo(self, what: str, fn: Callable[[], Any]) -> None:
        self._cleanups.append((what, fn))

    def _set_priority(self) -> None:
        """Heartbeats must go out on time on a busy host (as corosync does): SCHED_RR."""
        prio = self.cfg.cluster.realtime_priority
        if not prio:
            return
        try:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(prio))
        except OSError as e:
            self.log(
                "realtime-priority-unavailable",
                level="warning",
                priority=prio,
                error=e.strerror or str(e),
            )

    async def _start(self) -> None:
        cfg, loop = self.cfg, asyncio.get_running_loop()
        self._set_priority()
        addresses = [a for g in cfg.groups for a in g.addresses]
        self.host = HostSetup(cfg.cluster.interface, addresses, cfg.cluster.multicast_group)
        # pyroute2's synchronous API runs its own event loop: keep it off ours.
        await asyncio.to_thread(self.host.apply)
        host = self.host
        self._undo("host", lambda: asyncio.to_thread(host.restore))
        # Fail-closed from the first packet: the filter exists, owning nothing.
        started = dataplanes.start(
            ruleset_spec(cfg),
            self._state(),
            choice=cfg.cluster.dataplane,
            interface=cfg.cluster.interface,
            pins=dataplanes.pin_dir(cfg.cluster.bpf_pin_root, cfg.cluster.name, self.node.name),
            xdp_mode=cfg.cluster.xdp_mode,
        )
        self.dataplane = started.backend
        self._undo("dataplane", self._remove_dataplane)
        self.log("dataplane", **self.dataplane.describe(), reason=started.reason)
        vip_mac = multicast_mac(cfg.cluster.multicast_group)
        self.responder = Responder(cfg.cluster.interface, addresses, vip_mac)
        loop.add_reader(self.responder.fileno(), self.responder.on_readable)
        self._undo("responder", self._close_responder)
        self.responder.announce()
        if not self.manual:
            key = read_key(cfg)
            self.membership = MembershipDriver(self, key)
            self.membership.start(loop)
            self._undo("membership", self.membership.close)
        server = await serve(self.control_path, self._handle)
        self._undo("control", lambda: _close_server(server, self.control_path))
        if cfg.cluster.metrics_address:
            self.metrics.serve(cfg.cluster.metrics_address)
            self._undo("metrics", self.metrics.close)
        loop.create_task(self._housekeeping())

    async def _shutdown(self) -> None:
        while self._cleanups:
            what, fn = self._cleanups.pop()
            try:
                result = fn()
                if asyncio.iscoroutine(result):
                    await result
            except Exception as e:  # cleanup must go on whatever failed
                self.log("cleanup-failed", level="error", part=what, error=repr(e))
        self.log("stopped")

    def _remove_dataplane(self) -> None:
        if self.dataplane is not None:
            self.dataplane.remove()
            self.dataplane.close()
            self.dataplane = None

    def _close_responder(self) -> None:
        if self.responder is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.responder.fileno())
            self.responder.close()
            self.responder = None

    async def _housekeeping(self) -> None:
        """Every second: handover, systemd watchdog; every 5 s nft counters; ARP refresh."""
        wd = sdnotify.watchdog_interval()
        period = min(1.0, wd) if wd else 1.0
        ticks = 0
        while not self._stop.is_set():
            try:
                if self.manual and self.dataplane is not None and self.dataplane.backend == "xdp":
                    self.set_kernel_lease(MANUAL_XDP_LEASE_MS)
                if self.dataplane is not None and ticks % COUNTER_EVERY == 0:
                    self._packets = self.dataplane.counters()
                await self._handover_tick()
                self.publish()
                if wd:
                    sdnotify.notify("WATCHDOG=1")
                ticks += 1
                if self.responder is not None and ticks % 30 == 0:
                    self.responder.announce()  # keep switches' and clients' caches warm
            except Exception as e:
                self.log("housekeeping-failed", level="error", error=repr(e))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), period)

    def _reload(self) -> None:
        try:
            new, _ = load(self.cfg.source, with_key=not self.manual, node=self.node.name)
        except ConfigError as e:
            self.log("reload-rejected", level="error", error=str(e))
            return
        if new.digest() != self.cfg.digest() or new.cluster != self.cfg.cluster:
            self.log(
                "reload-needs-restart",
                level="warning",
                reason="ownership or cluster settings changed; restart the agent to apply",
            )
            return
        self.cfg = new
        self.log("reloaded", file=new.source)

    # ------------------------------------------------------------ applying claims
    def _state(self) -> dict[str, GroupBuckets]:
        out: dict[str, GroupBuckets] = {}
        for g in self.applied:
            snap = self.handover.snapshot(g)
            out[g] = GroupBuckets(owned=snap.owned, draining=snap.draining, incoming=snap.incoming)
        return out

    @property
    def claims(self) -> Claims:
        """Per group, the buckets this node takes new flows in (owned + incoming)."""
        return {g: self.handover.claims(g) for g in self.applied}

    def sync_kernel(self, since: float | None = None, reason: str = "") -> None:
        """Program the kernel with the handover state (one atomic transaction per change)."""
        new = self._state()
        if new == self.applied:
            return
        assert self.dataplane is not None
        t0 = time.monotonic()
        self.dataplane.update(new)
        t1 = time.monotonic()
        self.applied = new
        if self.membership is not None:
            self.membership.set_handover(self.handover.draining_count() > 0)
        self.updates += 1
        self.last_update_ms = (t1 - t0) * 1000
        if since is not None:
            self.metrics.reprogram.observe(t1 - since)
        self.log(
            "kernel-updated",
            reason=reason or None,
            owned={g: len(b.owned) for g, b in new.items()},
            draining={g: len(b.draining) for g, b in new.items()},
            incoming={g: len(b.incoming) for g, b in new.items()},
            took_ms=f"{self.last_update_ms:.2f}",
        )
        self.publish()

    def retarget(
        self,
        targets_: Mapping[str, frozenset[int]],
        others_draining: bool,
        since: float | None = None,
        reason: str = "",
        *,
        reclassify: bool = False,
    ) -> None:
        """Serve ``targets_`` from now on, through the handover sets, and program the kernel."""
        now = time.monotonic()
        for g, target in targets_.items():
            self.handover.retarget(g, target, others_draining, now, reclassify=reclassify)
        self.sync_kernel(since, reason)

    def set_kernel_lease(self, expires_ms: int | None) -> None:
        """The kernel's dead-man switch (``Dataplane.set_lease``); lapses are logged."""
        if self.dataplane is None:
            return
        self.dataplane.set_lease(expires_ms)
        self.lease_updates += 1
        held = expires_ms is None or expires_ms > 0
        if held != self.lease_held:
            self.lease_held = held
            self.log("kernel-lease", held=held, expires_ms=expires_ms)

    async def _handover_tick(self) -> None:
        """Release drained buckets (conntrack shows no flow left), promote incoming ones."""
        if not self.handover.groups or all(
            not s.draining and not s.incoming for s in self.handover.all_snapshots().values()
        ):
            return
        now = time.monotonic()
        if self.handover.draining_count():
            groups = {g.name: GroupFlows(frozenset(g.addresses), g.hash) for g in self.cfg.groups}
            try:
                rows = await asyncio.to_thread(self.dataplane_flow_rows)
            except Exception as e:  # flows unreadable: fall back to max_drain
                self.log("flows-unreadable", level="warning", error=repr(e))
                rows = None
            in_use = (
                buckets_in_use(rows, groups, self.cfg.buckets, self.cfg.cluster.hash_seed)
                if rows is not None
                else None
            )
            remaining = 0
            for g in self.handover.groups:
                draining = self.handover.snapshot(g).draining
                if in_use is None:
                    busy: frozenset[int] | set[int] = draining
                else:
                    busy = set(in_use[g])
                    remaining += sum(n for b, n in in_use[g].items() if b in draining)
                self.handover.drained(g, busy, now)
            self.flows_draining = remaining if in_use is not None else None
        others = self.others_draining()
        for g in self.handover.groups:
            self.handover.promote(g, others, now)
        self.sync_kernel(None, "handover")

    def dataplane_flow_rows(self) -> list[tuple[str, int, str, int, int, int | None]]:
        """This node's flows to its traffic IPs (conntrack or sockets + XDP flow map)."""
        assert self.dataplane is not None
        return self.dataplane.flow_rows()

    def others_draining(self) -> bool:
        """Whether another member may still hold flows in buckets it gave away (manual mode:
        assume so whenever another member was live; incoming then waits max_drain_ms)."""
        if self.membership is None:
            return any(m != self.node.name for m in self.manual_live)
        return self.membership.others_draining()

    # -------------------------------------------------------------- control requests
    async def _handle(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req["cmd"]
        if cmd == "status":
            if self.dataplane is not None:
                self._packets = self.dataplane.counters()  # fresh for the operator
            return {"ok": True, **self.status()}
        if cmd == "set-live":
            return self._set_live(req)
        if cmd in ("drain", "undrain"):
            if self.membership is None:
                return {"ok": False, "error": f"{cmd} needs membership mode (agent is manual)"}
            self.membership.set_draining(cmd == "drain")
            return {"ok": True, "draining": cmd == "drain"}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def _set_live(self, req: dict[str, Any]) -> dict[str, Any]:
        if not self.manual:
            return {"ok": False, "error": "set-live is only for agents in manual mode"}
        live = req.get("live")
        phase = req.get("phase", "take")
        names = {n.name for n in self.cfg.nodes}
        if not isinstance(live, list) or not all(isinstance(x, str) for x in live):
            return {"ok": False, "error": "'live' must be a list of node names"}
        unknown = [x for x in live if x not in names]
        if unknown:
            return {"ok": False, "error": f"unknown node {unknown[0]!r}"}
        if phase not in ("release", "take"):
            return {"ok": False, "error": "'phase' must be 'release' or 'take'"}
        target = targets(self.cfg, self.node.name, live)
        since = time.monotonic()
        others = self.others_draining()
        if phase == "release":  # phase 1 on every node: give away, take nothing yet
            target = release_step(self.claims, target)
            self.retarget(target, others, since, "set-live release")
        else:  # phase 2: take (from a member still running: through 'incoming')
            self.retarget(target, others, since, "set-live take")
            self.manual_live = tuple(n.name for n in self.cfg.nodes if n.name in set(live))
        return {"ok": True, "owned": {g: len(b) for g, b in self.claims.items()}}

    # ------------------------------------------------------------------ status
    def live_members(self) -> tuple[str, ...]:
        if self.membership is not None:
            return self.membership.live()
        return self.manual_live

    def status(self) -> dict[str, Any]:
        live = self.live_members()
        own = ownership(self.cfg, live)
        slot = self.node.slot
        groups: dict[str, Any] = {}
        for g in self.cfg.groups:
            o = own[g.name]
            snap = self.handover.snapshot(g.name)
            mine = snap.owned | snap.incoming
            groups[g.name] = {
                "addresses": [str(a) for a in g.addresses],
                "members": list(g.members),
                "hash": g.hash.value,
                "live": list(o.live),
                "shares": {m: fraction_text(f) for m, f in o.shares(self.cfg.slots).items()},
                "target_buckets": o.assignment.count(slot) if self.node.name in o.live else 0,
                "owned": {
                    "buckets": len(mine),
                    "share": fraction_text(_share(len(mine), self.cfg.buckets)),
                    "ranges": [list(r) for r in merge_ranges(mine)],
                },
                "draining": len(snap.draining),
                "incoming": len(snap.incoming),
                "packets": self._packets.get(g.name, {}),
            }
        out: dict[str, Any] = {
            "node": self.node.name,
            "slot": slot,
            "cluster": self.cfg.cluster.name,
            "mode": self.mode,
            "boot_id": self.boot_id.hex(),
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "live": list(live),
            "groups": groups,
            "dataplane": self.dataplane.describe()
            if self.dataplane is not None
            else {"backend": None, "mode": None, "program_id": None},
            "kernel": {
                "updates": self.updates,
                "last_update_ms": self.last_update_ms,
                "lease_held": self.lease_held,  # may take new flows (the dead-man switch)
                "lease_updates": self.lease_updates,
            },
            "handover": self.handover_status(),
            "arp": self.responder.counters() if self.responder else {},
        }
        if self.membership is not None:
            out["alive"] = list(self.membership.alive())
            out.update(self.membership.status())
        return out

    def handover_status(self) -> dict[str, Any]:
        snaps = self.handover.all_snapshots().values()
        deadline = self.handover.next_deadline()
        return {
            "draining_buckets": sum(len(s.draining) for s in snaps),
            "incoming_buckets": sum(len(s.incoming) for s in snaps),
            "flows_draining": self.flows_draining,
            "time_left_s": None
            if deadline is None
            else round(max(0.0, deadline - time.monotonic()), 1),
            "max_drain_s": self.handover.max_drain,
        }

    def publish(self) -> None:
        snap = Snapshot(
            owned_buckets={g: len(b) for g, b in self.claims.items()},
            packets=self._packets,
            arp=self.responder.counters() if self.responder else {},
        )
        if self.membership is not None:
            self.membership.fill_snapshot(snap)
        self.metrics.publish(snap)


def _share(n: int, total: int) -> Any:
    from fractions import Fraction

    return Fraction(n, total)


async def _close_server(server: asyncio.AbstractServer, path: Path) -> None:
    server.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(server.wait_closed(), 1.0)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
