"""In-memory network with a fake clock that drives membership cores (test harness).

Owns: a deterministic discrete-event simulation of N nodes running
:class:`~multihost.membership.protocol.MembershipCore`: multicast delivery to all other
nodes with seeded loss, duplication and random delay (hence reordering), clean partitions,
one-way link faults, node crash (the core and its kernel claims vanish) and restart (new
boot id, new core), pauses (a stopped process or VM: nothing reaches the core until it
resumes, then everything queued does), a modelled agent that applies each
``ClaimsChanged`` after a random lag (in order) and confirms it, and the checks: the
safety invariant over what every node's kernel serves, evaluated after every step;
convergence and coverage helpers for liveness.  Configs and timing are in
tests/sim/netsim_config.py; survivors' outages after crashes in tests/sim/netsim_outage.py.

The driver always advances to the earliest of (next queued event, earliest core deadline).

Must not: sleep, read real time, open sockets; all randomness comes from the seed.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from multihost.membership.config import MembershipConfig
from multihost.membership.effects import ClaimsChanged, Effect, Log, Rejected, Send, ViewChanged
from multihost.membership.ownership import BoolArray, empty
from multihost.membership.ownership import share_mask as table_share_mask
from multihost.membership.protocol import MembershipCore
from tests.sim.netsim_config import DELAY_MAX, SETTLE

INF = float("inf")


@dataclass
class NetParams:
    delay_min: float = 0.01
    delay_max: float = DELAY_MAX
    loss: float = 0.0
    dup: float = 0.0
    apply_lag_max: float = 0.05  # must stay below the configs' lease_margin


class SafetyViolationError(AssertionError):
    """Two up nodes served the same bucket (outside an allowed mutual suspicion)."""


@dataclass(frozen=True)
class Kernel:
    """What a node's data plane serves, and the core's view when it was computed."""

    masks: Mapping[str, BoolArray]
    view: frozenset[str]
    epoch: int


EMPTY_KERNEL = Kernel({}, frozenset(), 0)


@dataclass
class SimNode:
    name: str
    config: MembershipConfig
    core: MembershipCore | None = None
    incarnation: int = 0
    kernel: Kernel = EMPTY_KERNEL
    apply_free_at: float = 0.0
    deadline: float = INF
    paused_until: float = -INF  # a stopped process/VM: no input reaches the core before
    rejected: list[tuple[float, str, str | None]] = field(default_factory=list)
    logs: list[tuple[float, Log]] = field(default_factory=list)
    views: list[tuple[float, frozenset[str]]] = field(default_factory=list)
    # Per group and bucket: id of the view under which the core last claimed the bucket.
    validated: dict[str, npt.NDArray[np.int32]] = field(default_factory=dict)

    @property
    def up(self) -> bool:
        return self.core is not None

    @property
    def wakes(self) -> float:
        """When its core ticks next: at its deadline, or when it resumes if later."""
        return max(self.deadline, self.paused_until)

    def serves(self, group: str) -> int:
        mask = self.kernel.masks.get(group)
        return 0 if mask is None else int(np.count_nonzero(mask))


Observer = Callable[[SimNode, Kernel, Kernel, float], None]


class NetSim:
    """The simulation.  Create it, optionally schedule faults with :meth:`at`, then run."""

    def __init__(
        self,
        configs: Mapping[str, MembershipConfig],
        *,
        seed: int = 0,
        params: NetParams | None = None,
        allow_mutual_suspicion: bool = False,
        start: bool = True,
    ) -> None:
        self.rng = random.Random(seed)
        self.params = params if params is not None else NetParams()
        self.nodes = {n: SimNode(n, c) for n, c in configs.items()}
        # The checks use the first node's table (nodes with another one are a mismatch).
        self.table = next(iter(configs.values())).ownership_table
        self.buckets = self.table.buckets
        self.empty = empty(self.buckets)
        self.groups = sorted({g for c in configs.values() for g in c.groups})
        self.allow_mutual_suspicion = allow_mutual_suspicion
        self.now = 0.0
        self.steps = 0
        self.captured: list[tuple[float, str, bytes]] = []
        self.observers: list[Observer] = []
        # Per-node (min, max) apply lag overriding ``params.apply_lag_max`` (slow agents).
        self.apply_lag: dict[str, tuple[float, float]] = {}
        self.kernel_version = 0
        self._checked_version = -1
        self._coverage_version = -1
        self._coverage_ok = False
        self._balanced_key: object = None
        self._balanced_ok = False
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._sides: dict[str, int] | None = None
        self._view_ids: dict[frozenset[str], int] = {}
        self._view_list: list[frozenset[str]] = []
        self._down: set[tuple[str, str]] = set()
        if start:
            for name in self.nodes:
                self.start(name)

    # -------------------------------------------------------------- lifecycle

    def start(self, name: str) -> None:
        """(Re)start ``name``: a new core with a new random boot id, an empty kernel."""
        node = self.nodes[name]
        node.incarnation += 1
        node.core = MembershipCore(node.config, self.rng.randbytes(8), self.now)
        node.validated = {}
        self._set_kernel(node, EMPTY_KERNEL)
        node.apply_free_at = self.now
        self._handle(node, node.core.tick(self.now))

    restart = start

    def crash(self, name: str) -> None:
        node = self.nodes[name]
        node.core = None
        node.deadline = INF
        self._set_kernel(node, EMPTY_KERNEL)

    def pause(self, names: Iterable[str], seconds: float) -> None:
        """Stop ``names`` (their process or VM) for ``seconds``: their timers and every
        datagram or kernel confirmation for them wait until they resume."""
        for name in names:
            self.nodes[name].paused_until = self.now + seconds

    def set_draining(self, name: str, draining: bool) -> None:
        node = self.nodes[name]
        assert node.core is not None
        self._handle(node, node.core.set_draining(draining, self.now))

    # ----------------------------------------------------------------- network

    def partition(self, *sides: Iterable[str]) -> None:
        """Clean partition: nodes hear only nodes of their own side (unlisted: alone)."""
        self._sides = {n: i for i, side in enumerate(sides) for n in side}
        for i, n in enumerate(n for n in self.nodes if n not in self._sides):
            self._sides[n] = len(sides) + i

    def heal(self) -> None:
        """End the partition and every one-way link fault."""
        self._sides = None
        self._down.clear()

    def link(self, src: str, dst: str, up: bool) -> None:
        """One-way fault: datagrams from ``src`` to ``dst`` are dropped while down."""
        (self._down.discard if up else self._down.add)((src, dst))

    def link_ok(self, src: str, dst: str) -> bool:
        if (src, dst) in self._down:
            return False
        return self._sides is None or self._sides[src] == self._sides[dst]

    def inject(self, name: str, payload: bytes) -> list[Effect]:
        """Deliver ``payload`` to ``name`` now (bypassing the network); returns effects."""
        node = self.nodes[name]
        assert node.core is not None
        effects = node.core.receive(payload, self.now)
        self._handle(node, effects)
        self.check_safety()
        return effects

    def at(self, t: float, action: Callable[[], None]) -> None:
        self._push(t, action)

    def _push(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (t, next(self._order), fn))

    def _multicast(self, src: str, payload: bytes) -> None:
        self.captured.append((self.now, src, payload))
        p = self.params
        for dst in self.nodes:
            if dst == src or not self.link_ok(src, dst) or self.rng.random() < p.loss:
                continue
            copies = 2 if self.rng.random() < p.dup else 1
            for _ in range(copies):
                t = self.now + self.rng.uniform(p.delay_min, p.delay_max)
                self._push(t, functools.partial(self._deliver, dst, payload))

    def _deliver(self, dst: str, payload: bytes) -> None:
        node = self.nodes[dst]
        if self._deferred(node, functools.partial(self._deliver, dst, payload)):
            return  # queued in its socket until it runs again
        if node.core is not None:
            self._handle(node, node.core.receive(payload, self.now))

    def _deferred(self, node: SimNode, again: Callable[[], None]) -> bool:
        """If ``node`` is paused, run ``again`` when it resumes (in arrival order)."""
        if self.now >= node.paused_until:
            return False
        self._push(node.paused_until, again)
        return True

    # ------------------------------------------------------------------ agent

    def _handle(self, node: SimNode, effects: list[Effect]) -> None:
        core = node.core
        assert core is not None
        for e in effects:
            if isinstance(e, Send):
                self._multicast(node.name, e.payload)
            elif isinstance(e, ClaimsChanged):
                lo, hi = self.apply_lag.get(node.name, (0.0, self.params.apply_lag_max))
                lag = self.rng.uniform(lo, hi)
                t = max(node.apply_free_at, self.now + lag)
                node.apply_free_at = t
                kernel = Kernel(dict(e.masks), core.view, e.epoch)
                self._push(t, functools.partial(self._apply, node, node.incarnation, kernel))
            elif isinstance(e, ViewChanged):
                node.views.append((self.now, e.live))
                self.kernel_version += 1  # the safety check depends on views too
            elif isinstance(e, Rejected):
                node.rejected.append((self.now, e.reason, e.sender))
            elif isinstance(e, Log):
                node.logs.append((self.now, e))
        node.deadline = core.next_deadline()
        if self.allow_mutual_suspicion:  # the core re-validates its claims on every call
            vid = self._view_id(core.view - core.suspects)  # peers it hears
            for g, mask in core.claims.items():
                arr = node.validated.setdefault(g, np.full(self.buckets, -1, dtype=np.int32))
                arr[mask] = vid

    def _view_id(self, view: frozenset[str]) -> int:
        vid = self._view_ids.get(view)
        if vid is None:
            vid = self._view_ids[view] = len(self._view_list)
            self._view_list.append(view)
        return vid

    def _apply(self, node: SimNode, incarnation: int, kernel: Kernel) -> None:
        if node.core is None or node.incarnation != incarnation:
            return
        if self._deferred(node, functools.partial(self._apply, node, incarnation, kernel)):
            return
        self._set_kernel(node, kernel)
        self._handle(node, node.core.applied(kernel.epoch, self.now))

    def _set_kernel(self, node: SimNode, kernel: Kernel) -> None:
        old, node.kernel = node.kernel, kernel
        self.kernel_version += 1
        for observe in self.observers:
            observe(node, old, kernel, self.now)

    # ------------------------------------------------------------------ driver

    def run_until(self, t_end: float, stop: Callable[[], bool] | None = None) -> bool:
        """Advance to ``t_end`` (or until ``stop()`` holds after a step: returns True)."""
        stuck = 0
        while True:
            t_q = self._queue[0][0] if self._queue else INF
            up = [n for n in self.nodes.values() if n.core is not None]
            ticker = min(up, key=lambda n: n.wakes, default=None)
            t_d = ticker.wakes if ticker is not None else INF
            t = min(t_q, t_d)
            if t > t_end:
                break
            self.now = max(self.now, t)
            if ticker is not None and t_d <= t_q:
                assert ticker.core is not None
                self._handle(ticker, ticker.core.tick(self.now))
                stuck = stuck + 1 if ticker.deadline <= self.now else 0
                if stuck > 100:
                    raise RuntimeError(f"{ticker.name}: deadline does not advance at {self.now}")
            else:
                heapq.heappop(self._queue)[2]()
            self.steps += 1
            self.check_safety()
            if stop is not None and stop():
                return True
        self.now = max(self.now, t_end)
        return False

    def run_for(self, dt: float, stop: Callable[[], bool] | None = None) -> bool:
        return self.run_until(self.now + dt, stop)

    # ------------------------------------------------------------------ checks

    def check_safety(self) -> None:
        """No bucket is served by two up nodes, unless mutual suspicion is allowed and
        each validated its served claims while believing the other dead."""
        if self._checked_version == self.kernel_version:
            return
        self._checked_version = self.kernel_version
        up = [n for n in self.nodes.values() if n.up]
        for g in self.groups:
            holders = [(n, n.kernel.masks[g]) for n in up if g in n.kernel.masks]
            if len(holders) < 2:
                continue
            total = np.zeros(self.buckets, dtype=np.uint8)
            for _, mask in holders:
                total += mask
            if int(total.max()) <= 1:
                continue
            for (a, ma), (b, mb) in itertools.combinations(holders, 2):
                overlap = ma & mb
                if overlap.any() and not self._mutually_suspecting(a, b, g, overlap):
                    raise SafetyViolationError(
                        f"t={self.now:.3f} group {g}: {int(overlap.sum())} buckets served by "
                        f"{a.name} and {b.name} (current views {sorted(self.core(a.name).view)}"
                        f" / {sorted(self.core(b.name).view)})"
                    )

    def _mutually_suspecting(self, a: SimNode, b: SimNode, group: str, overlap: BoolArray) -> bool:
        """Did ``a`` and ``b`` each last claim every bucket of ``overlap`` while believing
        the other dead or suspect (not heard for interval + jitter)?  (The documented
        exception without quorum: bidirectional silence.)"""
        if not self.allow_mutual_suspicion:
            return False
        ids_a = a.validated[group][overlap].astype(np.int64)
        ids_b = b.validated[group][overlap].astype(np.int64)
        if min(int(ids_a.min()), int(ids_b.min())) < 0:
            return False  # served although the core never claimed it
        for code in np.unique(ids_a << 32 | ids_b).tolist():
            va, vb = self._view_list[code >> 32], self._view_list[code & 0xFFFFFFFF]
            if a.name in vb or b.name in va:
                return False
        return True

    def coverage(self, group: str) -> npt.NDArray[np.int64]:
        """How many up nodes serve each bucket of ``group``."""
        total = np.zeros(self.buckets, dtype=np.int64)
        for n in self.nodes.values():
            if n.up and group in n.kernel.masks:
                total += n.kernel.masks[group]
        return total

    def servable_groups(self) -> list[str]:
        """Groups with at least one up, non-draining member."""
        out = []
        for g in self.groups:
            for n in self.nodes.values():
                if n.core is not None and not n.core.draining and n.name in n.config.groups[g]:
                    out.append(g)
                    break
        return out

    def exactly_once(self) -> bool:
        """Every bucket of every servable group is served by exactly one up node."""
        if self._coverage_version != self.kernel_version:
            self._coverage_version = self.kernel_version
            self._coverage_ok = all(
                bool(np.all(self.coverage(g) == 1)) for g in self.servable_groups()
            )
        return self._coverage_ok

    def up_names(self) -> frozenset[str]:
        return frozenset(n.name for n in self.nodes.values() if n.up)

    def views_converged(self) -> bool:
        up = self.up_names()
        return all(n.core.view == up for n in self.nodes.values() if n.core is not None)

    def balanced(self) -> bool:
        """Every up node serves exactly its share under the live set of up, non-draining
        members (so every bucket of every servable group is served exactly once)."""
        draining = frozenset(n for n, x in self.nodes.items() if x.core and x.core.draining)
        key = (self.kernel_version, self.up_names(), draining)
        if key != self._balanced_key:
            self._balanced_key = key
            self._balanced_ok = all(self._balanced(g, draining) for g in self.groups)
        return self._balanced_ok

    def _balanced(self, group: str, draining: frozenset[str]) -> bool:
        nodes = [n for n in self.nodes.values() if n.up and n.name in n.config.groups[group]]
        live = frozenset(n.config.slot for n in nodes if n.name not in draining)
        for n in nodes:
            expected = table_share_mask(self.table, live, n.config.slot)
            if not np.array_equal(n.kernel.masks.get(group, self.empty), expected):
                return False
        return True

    def settled(self) -> bool:
        return self.views_converged() and self.balanced()

    def core(self, name: str) -> MembershipCore:
        core = self.nodes[name].core
        assert core is not None, f"{name} is down"
        return core


def settle(sim: NetSim, bound: float = SETTLE) -> float:
    """Run until views agree and every node serves its share; return the time it took."""
    t0 = sim.now
    assert sim.run_for(bound, stop=sim.settled), (
        f"not settled within {bound}: views "
        f"{ {n: sorted(x.core.view) for n, x in sim.nodes.items() if x.core} }"
    )
    return sim.now - t0
