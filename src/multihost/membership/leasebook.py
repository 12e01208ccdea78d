"""The core's book of leases: per alive peer, until when we hold its lease, and who need not
give one (suspects, newcomers).

Owns: :class:`LeaseBook` -- the memoised lease expiry per peer (recomputed only where that
peer's heartbeat or our send times change), the time validity of each lease at the latest
input, the set of suspects, the exemptions built on them and on newcomer leases, and the
kernel's dead-man deadline derived from all of that.  The arithmetic itself is
:mod:`.leases`; the reasoning ``docs/membership.md`` ("Timing rules").

Must not: decide claims, send or parse anything, or read clocks; the core calls
:meth:`LeaseBook.update` once per input, before anything asks a question at that ``now``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from multihost.membership.effects import Log
from multihost.membership.leases import (
    Timing,
    exempt,
    kernel_lease,
    lease_expiry,
    quorum_lease,
    suspect,
)
from multihost.membership.state import MemberState, PeerRecord

ALIVE = MemberState.ALIVE
# need_all(p): the fresh seq p must ack in every group of ours it belongs to.
NeedAll = Callable[[PeerRecord], int]


class LeaseBook:
    """Leases of one incarnation of this node (``slot``, ``boot``) from its ``peers``."""

    def __init__(
        self, peers: Mapping[str, PeerRecord], slot: int, boot: bytes, timing: Timing
    ) -> None:
        self._peers = peers
        self._slot = slot
        self._boot = boot
        self._timing = timing
        self._expiry: dict[str, float | None] = dict.fromkeys(peers)
        self._ok: dict[str, bool] = {}  # time-valid lease per alive peer, at the last update
        self.suspects: frozenset[str] = frozenset()  # alive, silent > interval + jitter
        self._exempt_all: frozenset[str] = frozenset()  # suspects exempt in all our groups

    # ------------------------------------------------------------------ facts in

    def refresh(self, p: PeerRecord, sent_at: Mapping[int, float]) -> None:
        """``p``'s heartbeat changed, or our send times (``sent_at``) did."""
        self._expiry[p.name] = lease_expiry(p, self._slot, self._boot, sent_at, self._timing)

    def update(self, alive: Iterable[PeerRecord], now: float, need_all: NeedAll) -> list[Log]:
        """Re-evaluate suspicion and each lease's time validity at ``now``; the logs say
        who turned suspect and whose lease lapsed (unless it need not give one)."""
        alive = list(alive)
        out: list[Log] = []
        suspects = frozenset(p.name for p in alive if suspect(p, now, self._timing))
        for name in sorted(suspects - self.suspects):
            out.append(Log("debug", "peer-suspect", {"member": name}))
        self.suspects = suspects
        self._exempt_all = frozenset(
            p.name for p in alive if p.name in suspects and self.exempt(p, need_all(p), now)
        )
        for p in alive:
            ok = self.time_ok(p, now)
            lapsed = self._ok.get(p.name) and not ok
            if lapsed and p.name not in self._exempt_all:
                out.append(Log("warning", "lease-lapsed", {"member": p.name}))
            self._ok[p.name] = ok
        return out

    # ----------------------------------------------------------------- questions

    def expiry(self, p: PeerRecord) -> float | None:
        return self._expiry[p.name]

    def time_ok(self, p: PeerRecord, now: float) -> bool:
        expiry = self._expiry[p.name]
        return expiry is not None and now < expiry

    def quorum(self, peers: Iterable[PeerRecord], now: float, members: int) -> bool:
        """Does this node, with the alive ``peers`` whose leases are time-valid, make a
        majority of the ``members``?"""
        reach = 1 + sum(p.state is ALIVE and self.time_ok(p, now) for p in peers)
        return 2 * reach > members

    def was_ok(self, p: PeerRecord) -> bool:
        """Time validity of ``p``'s lease at the last :meth:`update`."""
        return self._ok[p.name]

    def exempt(self, p: PeerRecord, need: int, now: float) -> bool:
        """A suspect ``p`` need not give us a lease (:func:`.leases.exempt`; the other
        alive peers are the witnesses)."""
        if p.name not in self.suspects:  # the suspicion test at this very ``now``
            return False
        seen = (x for x in self._peers.values() if x is not p and x.state is ALIVE)
        return exempt(p, self._slot, self._boot, need=need, now=now, t=self._timing, witnesses=seen)

    def exempt_all(self, p: PeerRecord) -> bool:
        """:meth:`exempt` with the fresh seq of every group of ours ``p`` is in, at the last
        :meth:`update` (computed there once per input: several questions use it)."""
        return p.name in self._exempt_all

    @staticmethod
    def newcomer(p: PeerRecord, now: float) -> bool:
        """Within ``p``'s newcomer lease (heard from its seq 1): no lease or view of it needed."""
        return p.newcomer_until is not None and now < p.newcomer_until

    def unheard_ok(self, p: PeerRecord, now: float) -> bool:
        """May ``p``'s view lack us without suspending us?  A newcomer that has not heard us
        yet takes nothing of ours within its newcomer lease, nor (suspect, never acked us)
        while the exemption from its lease holds."""
        return self.newcomer(p, now) or (not p.acked_us and p.name in self._exempt_all)

    def kernel_deadline(self, alive: Iterable[PeerRecord], quorum_of: int | None) -> float | None:
        """Until when the kernel may take new flows (None: no alive peer could take over).
        ``quorum_of``: the member count when quorum is on (a majority's leases stand in
        for every peer's)."""
        if quorum_of is not None:
            return quorum_lease(map(self.expiry, alive), quorum_of)
        needed = (p for p in alive if p.name not in self._exempt_all)
        return kernel_lease(map(self.expiry, needed))
