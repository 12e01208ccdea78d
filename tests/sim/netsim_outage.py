"""Survivors' outages after crashes in a simulated cluster (test harness for tests/sim/).

Owns: :class:`OutageWatch`, an observer of a :class:`~tests.sim.netsim.NetSim`: what every
survivor served when a node crashed must stay served by it, and the longest time any such
bucket went unserved.

Must not: drive the simulation (it only observes kernel updates).
"""

from __future__ import annotations

import numpy as np

from multihost.membership.ownership import BoolArray
from tests.sim.netsim import Kernel, NetSim, SimNode


class OutageWatch:
    """Liveness after crashes: every bucket a survivor serves when a node crashes must stay
    served by it (a crash only grows survivors' shares).  Records, per survivor, the longest
    time any such bucket went unserved; :meth:`check` fails beyond ``bound``."""

    def __init__(self, sim: NetSim) -> None:
        self.sim = sim
        self.kept: dict[str, dict[str, BoolArray]] = {}  # survivor -> group -> must serve
        self.since: dict[str, float] = {}
        self.longest: dict[str, float] = {}
        sim.observers.append(self._observe)

    def crashed(self) -> None:
        """Call right after ``sim.crash``: snapshot what every up node serves now."""
        for n in self.sim.nodes.values():
            if n.up:
                keep = self.kept.setdefault(n.name, {})
                for g, mask in n.kernel.masks.items():
                    keep[g] = keep.get(g, self.sim.empty) | mask
        for name in list(self.kept):
            if not self.sim.nodes[name].up:
                del self.kept[name]
                self.since.pop(name, None)

    def _observe(self, node: SimNode, old: Kernel, new: Kernel, now: float) -> None:
        keep = self.kept.get(node.name)
        if keep is None:
            return
        if not node.up:  # crashed itself: no longer a survivor
            del self.kept[node.name]
            self.since.pop(node.name, None)
            return
        missing = any(np.any(m & ~new.masks.get(g, self.sim.empty)) for g, m in keep.items())
        if missing:
            self.since.setdefault(node.name, now)
        elif node.name in self.since:
            gap = now - self.since.pop(node.name)
            self.longest[node.name] = max(self.longest.get(node.name, 0.0), gap)

    def worst(self) -> float:
        now = self.sim.now
        open_gaps = (now - t for t in self.since.values())
        return max([*self.longest.values(), *open_gaps], default=0.0)

    def check(self, bound: float) -> None:
        assert self.worst() <= bound, (
            f"a survivor's own buckets went unserved for {self.worst():.3f} s "
            f"(bound {bound}): {self.longest} open {self.since}"
        )
