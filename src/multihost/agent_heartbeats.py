"""The membership side of the agent's event loop: heartbeat socket, timer and link watch.

Owns: the cluster multicast socket (reading every queued heartbeat per wakeup, sending),
the one membership timer (``loop.call_at`` the core's next deadline; a timer more than
``LATE_WARNING`` late is counted and logged), the link watch (rtnetlink notifications ->
fence or rejoin), and carrying out the membership glue's :class:`Actions` in order: send,
log, then queue the kernel operations on :class:`~multihost.agent_kernel.KernelSync`
(which programs the kernel in its own thread and reports confirmations back through
:meth:`HeartbeatLoop.confirmed`).

Must not: decide membership, fencing or ownership (the glue and the core do), or touch the
kernel itself: nothing here waits for an nft transaction, so heartbeats go out on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable

from multihost import preflight
from multihost.agent_kernel import KernelSync
from multihost.agent_membership import Actions, Confirm, Lease, MembershipGlue, Retarget
from multihost.config import Config, NodeConfig
from multihost.linkwatch import LinkWatch, not_ready
from multihost.logfmt import EventLog
from multihost.mcast import destination, open_multicast

MAX_DATAGRAMS_PER_WAKEUP = 64
LATE_WARNING = 0.1  # s: a membership timer this late is logged (evidence of stalls)
DRAIN_ROUNDS = 4  # reads of the heartbeat socket per wake-up, at most (see _on_heartbeats)


class HeartbeatLoop:
    """``new_boot()``: a fresh boot id for a new incarnation (the agent keeps it)."""

    def __init__(
        self,
        cfg: Config,
        node: NodeConfig,
        glue: MembershipGlue,
        kernel: KernelSync,
        *,
        log: EventLog,
        new_boot: Callable[[], bytes],
    ) -> None:
        self.cfg = cfg
        self.node = node
        self.glue = glue
        self.kernel = kernel
        self.log = log
        self._new_boot = new_boot
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._links: LinkWatch | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._dest: tuple[str, int] | tuple[str, int, int, int] = ("", 0)
        self.late_timers = 0
        self.send_errors = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        c = self.cfg.cluster
        addr = preflight.heartbeat_address(self.cfg, self.node.name)
        self._sock = open_multicast(c.multicast_group, c.port, c.interface, addr)
        self._dest = destination(c.multicast_group, c.port, c.interface)
        loop.add_reader(self._sock.fileno(), self._on_heartbeats)
        self._links = LinkWatch()
        loop.add_reader(self._links.fileno(), self._on_link_event)
        self._check_link()  # first: an agent started before DAD ended stays silent
        self._perform(self.glue.tick(loop.time()))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for sock in (self._sock, self._links):
            if sock is not None:
                if self._loop is not None:
                    with contextlib.suppress(Exception):
                        self._loop.remove_reader(sock.fileno())
                sock.close()
        self._sock = None
        self._links = None

    # --------------------------------------------------------------------- inputs
    def _receive(self) -> list[bytes]:
        out: list[bytes] = []
        if self._sock is None:
            return out
        for _ in range(MAX_DATAGRAMS_PER_WAKEUP):
            try:
                out.append(self._sock.recv(2048))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.log("heartbeat-recv-failed", level="warning", error=str(e))
                break
        return out

    def _on_heartbeats(self) -> None:
        assert self._loop is not None
        # Heartbeats that arrived while the last ones were handled are read at once, not
        # after a trip through the selector: a wake-up (cache-cold) costs more than the
        # heartbeat itself.  Bounded, so a flood cannot hold the loop.
        for _ in range(DRAIN_ROUNDS):
            datagrams = self._receive()
            if not datagrams:
                break
            self._perform(self.glue.received(datagrams, self._loop.time()))

    def _on_timer(self) -> None:
        assert self._loop is not None
        assert self._timer is not None  # set by _schedule, the only caller of call_at
        late = self._loop.time() - self._timer.when()
        self._timer = None
        if late > LATE_WARNING:  # the loop (or the whole process) was held up
            self.late_timers += 1
            self.log("loop-late", level="warning", late_ms=round(late * 1000, 1))
        # Heartbeats queued meanwhile first: a late timer must not declare dead a peer
        # whose heartbeat is waiting.
        actions = self.glue.received(self._receive(), self._loop.time())
        actions.extend(self.glue.tick(self._loop.time()))
        self._perform(actions)

    def _on_link_event(self) -> None:
        if self._links is not None:
            self._links.drain()
        self._check_link()

    def _check_link(self) -> None:
        """Fence while the cluster link is down or cannot carry replies yet (IPv6: DAD still
        runs after the link came up); rejoin (a new incarnation) when it can."""
        assert self._loop is not None
        reason = not_ready(self.cfg.cluster.interface, self.cfg.uses_ipv6)
        if reason is not None:
            self._perform(self.glue.link_down(reason))
        elif self.glue.fenced:
            self._perform(self.glue.link_up(self._new_boot(), self._loop.time()))

    def set_draining(self, draining: bool) -> None:
        assert self._loop is not None
        self._perform(self.glue.set_draining(draining, self._loop.time()))

    def confirmed(self, epoch: int) -> None:
        """The kernel serves what the core decided up to ``epoch``: tell the core."""
        assert self._loop is not None
        self._perform(self.glue.applied(epoch, self._loop.time()))

    # -------------------------------------------------------------------- actions
    def _perform(self, actions: Actions) -> None:
        """Send, log, queue the kernel work (never wait for it), re-arm the timer."""
        for payload in actions.sends:
            self._send(payload)
        for line in actions.logs:
            self.log(line.event, level=line.level, **dict(line.fields))
        for op in actions.kernel:
            if isinstance(op, Retarget):
                if op.release_all:
                    self.kernel.release_all(op.reason)
                    continue
                empty = {g: frozenset[int]() for g in self.kernel.handover.groups}
                self.kernel.retarget(
                    op.claims or empty,
                    self.glue.others_draining(),
                    time.monotonic(),
                    op.since,
                    op.reason,
                    reclassify=op.reclassify,
                )
            elif isinstance(op, Lease):
                self.kernel.set_lease(op.until)
            elif isinstance(op, Confirm):
                self.kernel.confirm(op.epoch)
        self._schedule()

    def _send(self, payload: bytes) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(payload, self._dest)
        except OSError:
            self.send_errors += 1  # link down, buffer full: the next heartbeat retries

    def _schedule(self) -> None:
        assert self._loop is not None
        deadline = self.glue.next_deadline()
        if self._timer is not None:
            if abs(self._timer.when() - deadline) < 1e-4:
                return
            self._timer.cancel()
        self._timer = self._loop.call_at(deadline, self._on_timer)
