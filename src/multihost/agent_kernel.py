"""The agent's kernel side: the handover sets and the one thread that programs the kernel.

Owns: :class:`KernelThread` -- after ``install`` the only caller of the data plane
(``update``, ``set_lease``, ``counters``): one job at a time in submission order, pending
jobs coalesced (the newest bucket state, the newest lease, the newest confirmation), results
handed back to the event loop with ``call_soon_threadsafe`` -- and :class:`KernelSync`:
this node's :class:`~multihost.handover.Handover` sets, the state submitted to and the
state applied by the kernel, retargeting, the handover tick (flows still in use ->
drained, incoming -> owned), and the kernel bookkeeping ``status`` shows.

Must not: block the event loop on the kernel (nft transactions, XDP table writes and flow
dumps all run in threads, so a slow update never delays a heartbeat; the one exception is a
backend whose lease write is a single bounded map write, ``lease_inline``: XDP's lease is
written on the loop, so a renewal every interval costs no thread hand-off), decide ownership
(``membership``/``ownership`` do), or know sockets and heartbeats.  A lease is queued as an
absolute deadline and turned into milliseconds when it is written, so a write that waited
behind an update never outlives the core's lease; a confirmation is reported only once
everything queued before it is in the kernel.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from multihost.config import Config
from multihost.dataplane.backend import Backend
from multihost.dataplane.conntrack import GroupFlows, buckets_in_use
from multihost.dataplane.ruleset import GroupBuckets
from multihost.handover import Handover
from multihost.logfmt import EventLog
from multihost.metrics import Metrics

State = dict[str, GroupBuckets]
Claims = dict[str, frozenset[int]]
T = TypeVar("T")
INF = float("inf")


class KernelPlane(Protocol):
    """What the kernel thread writes through (the part of ``dataplane.backend.Backend``
    that changes the kernel)."""

    def update(self, state: Mapping[str, GroupBuckets]) -> Any: ...
    def set_lease(self, expires_ms: int | None) -> None: ...


def lease_inline(plane: object) -> bool:
    """Whether ``plane`` writes its lease with one bounded, non-blocking kernel write that
    is safe beside the kernel thread's work (then the loop writes it itself)."""
    return bool(getattr(plane, "lease_inline", False))


def held(ms: int | None) -> bool:
    """Whether a lease written as ``ms`` (see :func:`lease_ms`) lets the kernel take new flows."""
    return ms is None or ms > 0


def lease_ms(until: float, now: float) -> int | None:
    """``Dataplane.set_lease``'s argument for a lease held until ``until`` (``INF``: no
    expiry, None; past: 0, lapsed)."""
    if until == INF:
        return None
    return int((until - now) * 1000) if until > now else 0


@dataclass
class _Job:
    state: State | None = None
    since: float | None = None  # the view change this state answers (reprogram latency)
    reason: str = ""
    lease: float | None = None  # absolute deadline (see lease_ms); None: no lease write
    confirm: int | None = None
    call: Callable[[], Any] | None = None  # run alone, result into ``future``
    future: concurrent.futures.Future[Any] | None = None


@dataclass(frozen=True)
class Done:
    """What one coalesced job did (handed to the loop)."""

    state: State | None
    since: float | None
    reason: str
    lease_ms: int | None  # as written (when ``leased``)
    leased: bool
    flipped: bool  # the lease went from held to lapsed or back
    confirm: int | None
    took: float  # seconds the bucket update took
    ended: float  # time.monotonic() when it was in the kernel
    error: str = ""


class KernelThread:
    """A FIFO of kernel jobs served by one thread (the data plane is not thread-safe)."""

    def __init__(self, plane: KernelPlane, deliver: Callable[[Done], None]) -> None:
        self._plane = plane
        self._deliver = deliver  # called in the thread: must hand over to the loop itself
        # Lease writes are counted here and reported only when the held state changes (or
        # with an update): a renewal then costs the loop no wakeup at all.
        self.lease_writes = 0
        self.lease_held = True  # as installed: held without expiry
        self._cv = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self._closing = False
        self._thread = threading.Thread(target=self._main, name="multihost-kernel", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> None:
        with self._cv:
            if self._closing:
                return
            self._jobs.append(job)
            self._cv.notify()

    def call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run ``fn`` in the kernel thread after every job queued so far."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cv:
            if self._closing:
                fut.set_exception(RuntimeError("the kernel thread is closed"))
                return fut
            self._jobs.append(_Job(call=fn, future=fut))
            self._cv.notify()
        return fut

    def close(self, timeout: float = 10.0) -> None:
        """Finish the queued jobs, then stop the thread."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout)

    def _take(self) -> _Job | None:
        with self._cv:
            while not self._jobs and not self._closing:
                self._cv.wait()
            if not self._jobs:
                return None
            first = self._jobs.popleft()
            if first.call is not None:
                return first
            job = _Job(first.state, first.since, first.reason, first.lease, first.confirm)
            while self._jobs and self._jobs[0].call is None:
                nxt = self._jobs.popleft()
                if nxt.state is not None:
                    job.state, job.reason = nxt.state, nxt.reason
                    job.since = job.since if job.since is not None else nxt.since
                job.lease = nxt.lease if nxt.lease is not None else job.lease
                job.confirm = nxt.confirm if nxt.confirm is not None else job.confirm
            return job

    def _main(self) -> None:
        while (job := self._take()) is not None:
            if job.call is not None:
                assert job.future is not None
                try:
                    job.future.set_result(job.call())
                except BaseException as e:  # handed to the waiter
                    job.future.set_exception(e)
                continue
            done = self._run(job)
            if done.state is not None or done.confirm is not None or done.error or done.flipped:
                self._deliver(done)

    def _run(self, job: _Job) -> Done:
        ms: int | None = None
        took, error = 0.0, ""
        try:
            if job.lease is not None:  # first: a lapse must not wait behind an update
                ms = lease_ms(job.lease, time.monotonic())
                self._plane.set_lease(ms)
            if job.state is not None:
                t0 = time.monotonic()
                self._plane.update(job.state)
                took = time.monotonic() - t0
        except Exception as e:  # the kernel kept its previous state: confirm nothing
            error = repr(e)
        confirm = None if error else job.confirm
        leased = job.lease is not None and not error
        flipped = False
        if leased:
            self.lease_writes += 1
            now_held = held(ms)
            flipped, self.lease_held = now_held != self.lease_held, now_held
        ended = time.monotonic()
        return Done(
            job.state, job.since, job.reason, ms, leased, flipped, confirm, took, ended, error
        )


class KernelSync:
    """The handover sets and their way into the kernel.  ``on_applied(state)``: a state is
    in the kernel (on the loop); ``on_confirm(epoch)``: a :meth:`confirm` is due."""

    def __init__(
        self,
        cfg: Config,
        log: EventLog,
        metrics: Metrics,
        *,
        on_applied: Callable[[State], None],
        on_confirm: Callable[[int], None],
    ) -> None:
        self.cfg = cfg
        self.log = log
        self.metrics = metrics
        self.handover = Handover([g.name for g in cfg.groups], cfg.cluster.max_drain_ms / 1000)
        self.applied: State = {g.name: GroupBuckets() for g in cfg.groups}
        self._submitted: State = dict(self.applied)
        self._on_applied = on_applied
        self._on_confirm = on_confirm
        self._thread: KernelThread | None = None
        self._plane: Backend | None = None
        self._lease_writes = 0
        self._inline = False  # the plane's lease is written on the loop (lease_inline)
        self._inline_held = True  # as installed: held without expiry
        self._loop: asyncio.AbstractEventLoop | None = None
        self.updates = 0
        self.last_update_ms: float | None = None
        self.flows_draining: int | None = 0  # flows left in draining buckets (last look)

    def start(self, plane: Backend, loop: asyncio.AbstractEventLoop) -> None:
        """From now on the kernel is programmed only through this object's thread."""
        self._loop = loop
        self._plane = plane
        self._inline = lease_inline(plane)

        def deliver(done: Done) -> None:
            loop.call_soon_threadsafe(self._done, done)

        self._thread = KernelThread(plane, deliver)

    def close(self) -> None:
        if self._thread is not None:
            if not self._inline:
                self._lease_writes = self._thread.lease_writes
            self._thread.close()
            self._thread = None

    @property
    def lease_held(self) -> bool:
        """Whether the kernel may take new flows (its lease, as last reported)."""
        if self._inline:
            return self._inline_held
        return self._thread is None or self._thread.lease_held

    @property
    def lease_updates(self) -> int:
        """Kernel lease writes so far."""
        if self._inline or self._thread is None:
            return self._lease_writes
        return self._thread.lease_writes

    # ------------------------------------------------------------------- state
    def state(self) -> State:
        out: State = {}
        for g in self.applied:
            snap = self.handover.snapshot(g)
            out[g] = GroupBuckets(owned=snap.owned, draining=snap.draining, incoming=snap.incoming)
        return out

    @property
    def claims(self) -> Claims:
        """Per group, the buckets this node takes new flows in (owned + incoming)."""
        return {g: self.handover.claims(g) for g in self.applied}

    # ------------------------------------------------------------------- inputs
    def sync(self, since: float | None = None, reason: str = "") -> None:
        """Queue the handover state for the kernel (one atomic transaction per change)."""
        new = self.state()
        if new == self._submitted:
            return
        self._submitted = new
        self._submit(_Job(state=new, since=since, reason=reason))

    def retarget(
        self,
        targets: Mapping[str, frozenset[int]],
        others_draining: bool,
        now: float,
        since: float | None = None,
        reason: str = "",
        *,
        reclassify: bool = False,
    ) -> None:
        """Serve ``targets`` from now on, through the handover sets."""
        for g, target in targets.items():
            self.handover.retarget(g, target, others_draining, now, reclassify=reclassify)
        self.sync(since, reason)

    def release_all(self, reason: str) -> None:
        for g in self.handover.groups:
            self.handover.release_all(g)
        self.sync(None, reason)

    def set_lease(self, until: float) -> None:
        """The kernel's lease until ``until`` (monotonic; ``INF``: no expiry)."""
        if not self._inline:
            self._submit(_Job(lease=until))
            return
        assert self._plane is not None
        ms = lease_ms(until, time.monotonic())
        try:
            self._plane.set_lease(ms)
        except Exception as e:  # the kernel kept its previous lease (it lapses by itself)
            self.log("kernel-update-failed", level="error", reason="lease", error=repr(e))
            return
        self._lease_writes += 1
        now_held = held(ms)
        if now_held != self._inline_held:
            self._inline_held = now_held
            self._log_lease(ms)

    def confirm(self, epoch: int) -> None:
        self._submit(_Job(confirm=epoch))

    async def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` in the kernel thread, after everything queued so far is in the kernel."""
        assert self._thread is not None
        return await asyncio.wrap_future(self._thread.call(fn))

    async def barrier(self) -> None:
        """Return once everything queued so far is in the kernel."""
        await self.call(lambda: None)

    def _submit(self, job: _Job) -> None:
        assert self._thread is not None, "KernelSync.start() first"
        self._thread.submit(job)

    # ----------------------------------------------------------------- results
    def _log_lease(self, ms: int | None) -> None:
        """The kernel's lease went from held to lapsed or back (written as ``ms``)."""
        self.log("kernel-lease", held=held(ms), expires_ms=ms)

    def _done(self, d: Done) -> None:
        if d.error:
            self.log("kernel-update-failed", level="error", reason=d.reason or None, error=d.error)
            return
        if d.flipped:
            self._log_lease(d.lease_ms)
        if d.state is not None:
            self.applied = d.state
            self.updates += 1
            self.last_update_ms = d.took * 1000
            if d.since is not None:
                self.metrics.reprogram.observe(d.ended - d.since)
            self.log(
                "kernel-updated",
                reason=d.reason or None,
                owned={g: len(b.owned) for g, b in d.state.items()},
                draining={g: len(b.draining) for g, b in d.state.items()},
                incoming={g: len(b.incoming) for g, b in d.state.items()},
                took_ms=f"{self.last_update_ms:.2f}",
            )
            self._on_applied(d.state)
        if d.confirm is not None:
            self._on_confirm(d.confirm)

    # --------------------------------------------------------------- handover
    async def handover_tick(self, others_draining: Callable[[], bool]) -> None:
        """Release drained buckets (no flow left in them), promote incoming ones."""
        if not self.handover.groups or all(
            not s.draining and not s.incoming for s in self.handover.all_snapshots().values()
        ):
            return
        now = time.monotonic()
        if self.handover.draining_count():
            try:  # in the kernel thread: the backend reads its own flow state
                in_use = await self.call(self._flows_in_use)
            except Exception as e:  # flows unreadable: fall back to max_drain
                self.log("flows-unreadable", level="warning", error=repr(e))
                in_use = None
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
        others = others_draining()
        for g in self.handover.groups:
            self.handover.promote(g, others, now)
        self.sync(None, "handover")

    def _flows_in_use(self) -> dict[str, Counter[int]]:
        """Per group, bucket -> this node's flows in it (conntrack, or sockets + the XDP
        flow map: the backend's ``flow_rows``).  Runs in the kernel thread."""
        assert self._plane is not None
        cfg = self.cfg
        groups = {g.name: GroupFlows(frozenset(g.addresses), g.hash) for g in cfg.groups}
        return buckets_in_use(self._plane.flow_rows(), groups, cfg.buckets, cfg.cluster.hash_seed)

    def status(self) -> dict[str, Any]:
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
