"""The core's memoised derived state equals its from-scratch definition after every step.

The core keeps each peer's lease expiry (recomputed only where the peer's heartbeat or our
send-time table changes) and answers ``exempt`` from the suspect set computed in the same
input.  This checks both against :mod:`multihost.membership.leases` evaluated from the
records, after every simulation step, through loss, duplication, crashes, restarts, a
partition and drains (white-box: it reads the core's records).
"""

from __future__ import annotations

from multihost.membership.leases import exempt, kernel_lease, lease_expiry, quorum_lease
from multihost.membership.protocol import MembershipCore
from multihost.membership.state import MemberState
from tests.sim.netsim import NetParams, NetSim
from tests.sim.netsim_config import DEAD_AFTER, make_configs


def _check(core: MembershipCore) -> None:
    now, t = core._now, core._timing
    peers = list(core._peers.values())
    alive = [p for p in peers if p.state is MemberState.ALIVE]
    for p in peers:
        want = lease_expiry(p, core._slot, core._boot, core._sent_at, t)
        assert core._leases.expiry(p) == want, (core.config.node, p.name)
    needed = []
    for p in alive:
        need = core._need_all(p)
        seen = [x for x in alive if x is not p]
        ref = exempt(p, core._slot, core._boot, need=need, now=now, t=t, witnesses=seen)
        assert core._leases.exempt(p, need, now) == ref
        assert core._leases.exempt_all(p) == ref
        if not ref:
            needed.append(p)
    exp = [lease_expiry(p, core._slot, core._boot, core._sent_at, t) for p in alive]
    if core.config.quorum:
        want_lease = quorum_lease(exp, len(core.config.members))
    else:
        want_lease = kernel_lease(
            lease_expiry(p, core._slot, core._boot, core._sent_at, t) for p in needed
        )
    assert core.lease_deadline() == want_lease


def _run(quorum: bool, seed: int) -> None:
    configs = make_configs(4, groups={"all": range(4), "g": (0, 2)}, quorum=quorum)
    sim = NetSim(
        configs, seed=seed, params=NetParams(loss=0.1, dup=0.05), allow_mutual_suspicion=True
    )
    checks = 0

    def check() -> bool:
        nonlocal checks
        for node in sim.nodes.values():
            if node.core is not None:
                _check(node.core)
                checks += 1
        return False

    sim.run_for(3 * DEAD_AFTER, check)
    sim.crash("n1")
    sim.run_for(2 * DEAD_AFTER, check)
    sim.restart("n1")
    sim.partition(["n0", "n1"], ["n2", "n3"])
    sim.run_for(2 * DEAD_AFTER, check)
    sim.heal()
    sim.set_draining("n3", True)
    sim.run_for(2 * DEAD_AFTER, check)
    sim.set_draining("n3", False)
    sim.run_for(2 * DEAD_AFTER, check)
    assert checks > 1000


def test_memoised_leases_match_their_definition_without_quorum() -> None:
    for seed in (1, 2):
        _run(False, seed)


def test_memoised_leases_match_their_definition_with_quorum() -> None:
    _run(True, 3)
