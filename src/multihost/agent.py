"""The agent: the one event loop that owns this node's share of the traffic IPs.

Owns: the process and its event loop, wired to the layers below -- host setup (traffic
IPs on ``lo``, ARP sysctls, multicast membership), starting the data plane backend (nft:
an owner-flagged table held through this process's nft context, so the kernel drops it if
this process dies; or XDP; afterwards programmed only through :mod:`multihost.agent_kernel`'s
thread), the ARP responder, membership (:mod:`multihost.agent_heartbeats` owns the
heartbeat socket, timer and link watch and carries out :mod:`multihost.agent_membership`'s
actions) or manual mode, where ``set-live`` requests decide the live set; the control
socket, ``status``, metrics, systemd notifications and signals (SIGTERM/SIGINT: clean stop
that releases everything; SIGHUP: reload the configuration if it is valid).

Must not: decide ownership or membership itself (``ownership``/``membership`` do), render
nft rules (``dataplane.rulesettables`` does), or wait for the kernel on the event loop (heartbeats
go out on time whatever an nft transaction or an XDP map write costs).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from multihost import sdnotify
from multihost.agent_heartbeats import HeartbeatLoop
from multihost.agent_kernel import Claims, KernelSync, State
from multihost.agent_membership import MembershipGlue, membership_config
from multihost.assignment import merge_ranges
from multihost.config import Config, ConfigError, IPAddress, read_key
from multihost.control import serve
from multihost.dataplane import backend as dataplanes
from multihost.dataplane.hostsetup import HostSetup
from multihost.dataplane.responder import Responder
from multihost.dataplane.transparent import TransparentSetup
from multihost.handover import Handover
from multihost.linkwatch import not_ready
from multihost.logfmt import EventLog
from multihost.macaddr import format_mac, multicast_mac
from multihost.metrics import Metrics, Snapshot
from multihost.ownership import ownership, release_step, targets
from multihost.preflight import load, ruleset_spec
from multihost.simulation import fraction_text
from multihost.tablechoice import table_identity
from multihost.transparency import TransparencyConfig

#: Housekeeping ticks (seconds) between reads of the nft counters (status, metrics).
COUNTER_EVERY = 5
#: Manual mode on the XDP backend: the kernel lease, renewed every housekeeping tick.  The
#: XDP program outlives a killed agent (nft's owned table does not), so without a lease a
#: dead manual agent's node would go on taking new flows.
MANUAL_XDP_LEASE_MS = 3000


def _gateways_by_interface(cfg: Config) -> dict[str, list[IPAddress]]:
    """Return groups' gateway addresses by the interface they are answered on."""
    out: dict[str, list[IPAddress]] = {}
    for r in cfg.returns:
        out.setdefault(r.interface, []).extend(r.addresses)
    return out


def transparent_setup(cfg: Config) -> TransparentSetup | None:
    """The transparent-proxy plumbing for the families of the transparent groups' traffic
    IPs (None without transparent groups)."""
    families = {a.version for g in cfg.groups if g.transparent for a in g.addresses}
    if not families:
        return None
    t = cfg.transparency or TransparencyConfig()
    return TransparentSetup(t.fwmark, t.table, t.rule_priority, families)


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
        self.metrics = Metrics(node)
        self.kernel = KernelSync(
            cfg, self.log, self.metrics, on_applied=self._applied, on_confirm=self._confirm
        )
        self.manual_live: tuple[str, ...] = ()
        self.snapshot = Snapshot()
        self._stop = asyncio.Event()
        self._cleanups: list[tuple[str, Callable[[], Any]]] = []
        self.host: HostSetup | None = None
        self.dataplane: dataplanes.Backend | None = None
        self.responder: Responder | None = None
        self.return_responders: list[Responder] = []  # return groups on other interfaces
        self.membership: MembershipGlue | None = None
        self.heartbeats: HeartbeatLoop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._packets: dict[str, dict[str, int]] = {}

    @property
    def handover(self) -> Handover:
        return self.kernel.handover

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
                **{
                    f"vip_mac{'' if fam == 4 else '6'}": format_mac(multicast_mac(g))
                    for fam, g in ((4, self.cfg.cluster.arp_group), (6, self.cfg.cluster.ndp_group))
                    if g is not None
                },
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
        cfg = self.cfg
        self._loop = loop = asyncio.get_running_loop()
        addresses = [a for g in cfg.groups for a in g.addresses]
        gateways = _gateways_by_interface(cfg)  # return groups (IP transparency)
        extra = [i for i in gateways if i != cfg.cluster.interface]
        self.host = HostSetup(
            cfg.cluster.interface,
            addresses + [a for addrs in gateways.values() for a in addrs],
            cfg.cluster.groups,
            extra_interfaces=extra,
            transparent=transparent_setup(cfg),
        )
        # pyroute2's synchronous API runs its own event loop: keep it off ours.
        await asyncio.to_thread(self.host.apply)
        host = self.host
        self._undo("host", lambda: asyncio.to_thread(host.restore))
        # Fail-closed from the first packet: the filter exists, owning nothing.
        started = dataplanes.start(
            ruleset_spec(cfg),
            self.kernel.state(),
            choice=cfg.cluster.dataplane,
            interface=cfg.cluster.interface,
            pins=dataplanes.pin_dir(cfg.cluster.bpf_pin_root, cfg.cluster.name, self.node.name),
            xdp_mode=cfg.cluster.xdp_mode,
        )
        self.dataplane = started.backend
        # Real-time only now: the set-up above (an XDP program through the verifier, an nft
        # table) is long CPU work in the kernel, and at SCHED_RR it held the CPU for a whole
        # 100 ms time slice from every other agent's heartbeat loop there (lab start-up: the
        # running agents logged 'paused' 80-112 ms, again and again).  The kernel thread
        # started next inherits the policy, as the loop's own lease writes need.
        self._set_priority()
        self.kernel.start(self.dataplane, loop)
        self._undo("dataplane", self._remove_dataplane)
        self.log("dataplane", **self.dataplane.describe(), reason=started.reason)
        arp_group, ndp_group = cfg.cluster.arp_group, cfg.cluster.ndp_group
        mac6 = multicast_mac(ndp_group) if ndp_group is not None else None
        # An IPv6-only cluster answers no ARP: its "ARP MAC" is only a placeholder.
        mac4 = multicast_mac(arp_group) if arp_group is not None else mac6
        assert mac4 is not None  # config: a cluster has at least one group
        main = addresses + gateways.get(cfg.cluster.interface, [])
        self.responder = Responder(cfg.cluster.interface, main, mac4, mac6)
        loop.add_reader(self.responder.fileno(), self.responder.on_readable)
        self._undo("responder", self._close_responder)
        self.responder.announce()
        for iface in extra:  # the back ends' gateway, answered with the cluster MAC there
            r = Responder(iface, gateways[iface], mac4, mac6)
            self.return_responders.append(r)
            loop.add_reader(r.fileno(), r.on_readable)
            r.announce()
        if not self.manual:
            self._start_membership(read_key(cfg))
            assert self.heartbeats is not None
            self._undo("membership", self.heartbeats.close)
        server = await serve(self.control_path, self._handle)
        self._undo("control", lambda: _close_server(server, self.control_path))
        if cfg.cluster.metrics_address:
            self.metrics.serve(cfg.cluster.metrics_address)
            self._undo("metrics", self.metrics.close)
        task = loop.create_task(self._housekeeping())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
        self.kernel.close()  # what was queued goes in first; then nobody else programs it
        if self.dataplane is not None:
            self.dataplane.remove()
            self.dataplane.close()
            self.dataplane = None

    def _close_responder(self) -> None:
        for r in self.return_responders:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(r.fileno())
            r.close()
        self.return_responders = []
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
                    self.kernel.set_lease(time.monotonic() + MANUAL_XDP_LEASE_MS / 1000)
                if self.dataplane is not None and ticks % COUNTER_EVERY == 0:
                    self._packets = await self.kernel.call(self.dataplane.counters)
                await self.kernel.handover_tick(self.others_draining)
                self.publish()
                if wd:
                    sdnotify.notify("WATCHDOG=1")
                ticks += 1
                if self.responder is not None and ticks % 30 == 0:
                    self.responder.announce()  # keep switches' and clients' caches warm
                    for r in self.return_responders:
                        r.announce()
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
        if (
            new.digest() != self.cfg.digest()
            or new.cluster != self.cfg.cluster
            or new.returns != self.cfg.returns
            or new.transparency != self.cfg.transparency
            or [g.transparent for g in new.groups] != [g.transparent for g in self.cfg.groups]
        ):
            self.log(
                "reload-needs-restart",
                level="warning",
                reason="ownership, cluster or transparency settings changed; restart the agent"
                " to apply",
            )
            return
        self.cfg = new
        self.log("reloaded", file=new.source)

    # --------------------------------------------------------------- membership
    def _start_membership(self, key: bytes) -> None:
        assert self._loop is not None
        self.membership = MembershipGlue(
            membership_config(self.cfg, self.node.name, key),
            self.boot_id,
            self._loop.time(),
            names=[n.name for n in self.cfg.nodes],
            link_up=lambda: not_ready(self.cfg.cluster.interface, self.cfg.uses_ipv6) is None,
        )
        self.heartbeats = HeartbeatLoop(
            self.cfg, self.node, self.membership, self.kernel, log=self.log, new_boot=self._new_boot
        )
        self.heartbeats.start(self._loop)

    def _new_boot(self) -> bytes:
        """A new incarnation (the link came back): a new boot id, shown in ``status``."""
        self.boot_id = os.urandom(8)
        return self.boot_id

    def _confirm(self, epoch: int) -> None:
        """The kernel serves what the core decided up to ``epoch``: tell the core."""
        if self.heartbeats is not None:
            self.heartbeats.confirmed(epoch)

    def _applied(self, state: State) -> None:
        if self.membership is not None:
            self.membership.set_handover(any(b.draining for b in state.values()))
        self.publish()

    @property
    def claims(self) -> Claims:
        """Per group, the buckets this node takes new flows in (owned + incoming)."""
        return self.kernel.claims

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
            if self.dataplane is not None:  # fresh for the operator
                self._packets = await self.kernel.call(self.dataplane.counters)
            return {"ok": True, **self.status()}
        if cmd == "set-live":
            return await self._set_live(req)
        if cmd in ("drain", "undrain"):
            if self.membership is None:
                return {"ok": False, "error": f"{cmd} needs membership mode (agent is manual)"}
            assert self.heartbeats is not None
            self.heartbeats.set_draining(cmd == "drain")
            return {"ok": True, "draining": cmd == "drain"}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    async def _set_live(self, req: dict[str, Any]) -> dict[str, Any]:
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
            self.kernel.retarget(target, others, since, since, "set-live release")
        else:  # phase 2: take (from a member still running: through 'incoming')
            self.kernel.retarget(target, others, since, since, "set-live take")
            self.manual_live = tuple(n.name for n in self.cfg.nodes if n.name in set(live))
        await self.kernel.barrier()  # the caller's next phase relies on this one's release
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
                "buckets": self.cfg.buckets,
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
        returns = {  # IP transparency: replies decided by their front group's buckets
            r.name: {
                "return_for": r.front,
                "addresses": [str(a) for a in r.addresses],
                "interface": r.interface,
                "hash": r.hash.value,
                "packets": self._packets.get(r.name, {}),
            }
            for r in self.cfg.returns
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
            "table": {
                **table_identity(self.cfg.table).as_dict(),
                "weights": {n.name: n.weight for n in self.cfg.nodes},
            },
            "groups": groups,
            "return_groups": returns,
            "dataplane": self.dataplane.describe()
            if self.dataplane is not None
            else {"backend": None, "mode": None, "program_id": None},
            "kernel": {
                "updates": self.kernel.updates,
                "last_update_ms": self.kernel.last_update_ms,
                "lease_held": self.kernel.lease_held,  # may take new flows (dead-man switch)
                "lease_updates": self.kernel.lease_updates,
            },
            "handover": self.kernel.status(),
            "arp": self.responder.counters() if self.responder else {},
            "arp_return": {r.interface: r.counters() for r in self.return_responders},
        }
        if self.membership is not None:
            out["alive"] = list(self.membership.alive())
            hb = self.heartbeats
            io = {"send_errors": hb.send_errors, "late_timers": hb.late_timers} if hb else {}
            now = self._loop.time() if self._loop is not None else time.monotonic()
            out.update(self.membership.status(now, io))
        return out

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
