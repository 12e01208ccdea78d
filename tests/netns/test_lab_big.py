"""Labs beyond 8 nodes and with weights, real packets through real data planes.

``lab up --nodes 12`` on nft (the min-wise table of 27,720 buckets), ``--nodes 16`` on XDP
(720,720 buckets) and a weighted lab, each with heartbeats (not manual): a probe of 5,000
TCP connections is answered once per flow by the node ``whohas``' model predicts, every
node's count lies in the binomial 99.9 % band of its exact share; a crash of one member
moves only the flows it answered (every other flow is answered by the same node as
before), and its recovery restores every flow's node.  A 4-node lab with ``table = "minimal"`` (12
buckets) does the same on both data planes.

Heavy on a 2-vCPU machine (16 agents, 16 nginx): one lab at a time.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator

import pytest

from multihost.lab import build, faults
from multihost.lab.clean import clean
from multihost.lab.failover import agent_status, wait_converged
from multihost.lab.naming import state_dir
from multihost.lab.probe import ProbeResult, run_probe
from multihost.lab.state import LabError, LabState
from multihost.lab.topology import describe

CONNECTIONS = 5000
SEED = 0x5EED1234


@contextlib.contextmanager
def _lab(
    nodes: int, backend: str, weights: dict[str, int] | None = None, table: str = "factorial"
) -> Iterator[LabState]:
    prefix = f"mhtB{secrets.token_hex(2)}-"
    try:
        # A fixed hash seed (the probe's ports are fixed too): the per-node counts are then
        # reproducible, and the 99.9 % band is checked once for this seed, not redrawn on
        # every run (a random seed failed the band ~1 run in 30 by chance alone).
        topo = describe(nodes, prefix=prefix, weights=weights, table_kind=table, seed=SEED)
        # the lab's default heartbeat: 25 ms x nodes above 8 (agents.default_heartbeat_ms)
        state = build.build(topo, backend=backend)
        assert set(state.agents["dataplane"].values()) == {backend}
        _converge(state, topo.members)
        yield state
    finally:
        clean(prefix)
        assert not state_dir(prefix).exists()


def _converge(state: LabState, live: tuple[str, ...]) -> None:
    """wait_converged, and on a timeout what every agent says (owned, live, epochs, lease)."""
    try:
        wait_converged(state, live, timeout=120)
    except LabError as e:
        seen = {}
        for n in state.topology.members:
            st = agent_status(state, n, timeout=5.0)
            seen[n] = st and (
                st["groups"]["web"]["owned"]["buckets"],
                ",".join(st["live"]),
                st.get("epoch"),
                st.get("applied_epoch"),
                st["kernel"]["lease_held"],
            )
        raise AssertionError(f"{e}: {seen}") from None


def _probe(state: LabState, live: tuple[str, ...]) -> ProbeResult:
    r = run_probe(state, "tcp", CONNECTIONS, port_seed=14, concurrency=100, timeout=5.0)
    assert (r.failed, r.reset, r.timeout, r.duplicated) == (0, 0, 0, 0), r.to_dict()
    assert r.mispredicted == 0, r.to_dict()
    assert sum(r.answered.values()) == CONNECTIONS
    assert set(r.answered) == set(live) == set(r.shares), r.to_dict()
    assert not r.outside_band, (r.answered, r.band)
    return r


def _fail_and_recover(state: LabState, victim: str) -> None:
    members = state.topology.members
    before = _probe(state, members)
    faults.fail(state, victim, "crash")
    rest = tuple(m for m in members if m != victim)
    _converge(state, rest)
    after = _probe(state, rest)
    moved = [
        i for i, (b, a) in enumerate(zip(before.by_flow, after.by_flow, strict=True)) if b != a
    ]
    assert all(before.by_flow[i] == victim for i in moved)  # only the victim's flows moved
    assert len(moved) == before.answered[victim]  # ... all of them
    faults.recover(state, victim)
    _converge(state, members)
    again = _probe(state, members)
    assert again.by_flow == before.by_flow  # recovery moves exactly those back


@pytest.mark.parametrize(("nodes", "backend"), [(12, "nft"), (16, "xdp")])
def test_big_lab_exact_shares_and_a_failure_moves_only_its_share(nodes: int, backend: str) -> None:
    with _lab(nodes, backend) as state:
        assert state.topology.buckets == {12: 27_720, 16: 720_720}[nodes]
        st = agent_status(state, "A", timeout=5.0)
        assert st is not None
        assert (st["table"]["name"], st["table"]["buckets"]) == (
            f"minwise-{nodes}",
            state.topology.buckets,
        )
        _fail_and_recover(state, state.topology.members[-1])


def test_weighted_lab_shares_follow_the_weights() -> None:
    with _lab(4, "nft", {"A": 3, "B": 2}) as state:
        st = agent_status(state, "C", timeout=5.0)
        assert st is not None
        assert st["table"]["weights"] == {"A": 3, "B": 2, "C": 1, "D": 1}
        assert st["table"]["name"] == "factorial-8/weights-0:3,1:2,2:1,3:1"
        assert st["groups"]["web"]["shares"] == {"A": "3/7", "B": "2/7", "C": "1/7", "D": "1/7"}
        r = _probe(state, state.topology.members)
        assert {m: str(f) for m, f in r.shares.items()} == {
            "A": "3/7",
            "B": "2/7",
            "C": "1/7",
            "D": "1/7",
        }
        _fail_and_recover(state, "A")  # the heaviest: all its virtual slots fail together


@pytest.mark.parametrize("backend", ["nft", "xdp"])
def test_minimal_table_lab_twelve_buckets_exact_and_a_failure_moves_only_its_share(
    backend: str,
) -> None:
    with _lab(4, backend, table="minimal") as state:
        assert state.topology.buckets == 12
        st = agent_status(state, "B", timeout=5.0)
        assert st is not None
        assert (st["table"]["name"], st["table"]["buckets"]) == ("minwise-4", 12)
        assert st["groups"]["web"]["owned"]["buckets"] == 3
        _fail_and_recover(state, "C")
