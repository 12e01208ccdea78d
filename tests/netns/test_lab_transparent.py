"""IP transparency end to end: client -> traffic IP -> a node's transparent proxy (nginx,
``proxy_bind $remote_addr transparent``) -> a back end (nginx logging ``$remote_addr``) ->
the reply back through the node that holds the connection (``lab up --transparent``).

One lab per module and data plane, with the agents' membership protocol running (so a
failed node's share moves to the survivors); the fixture removes everything even when a
test fails, and checks that nothing of the lab is left.
"""

from __future__ import annotations

import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from multihost.lab import backbuild, build, faults
from multihost.lab.backnet import ReturnMode
from multihost.lab.clean import clean, lab_namespaces, pids_in_namespaces
from multihost.lab.failover import wait_converged
from multihost.lab.naming import state_dir
from multihost.lab.probe import ProbeResult, run_probe
from multihost.lab.state import LabState
from multihost.lab.topology import describe

MODES = (ReturnMode.ROUTES, ReturnMode.GATEWAY)


@pytest.fixture(scope="module", params=MODES)
def lab(request: pytest.FixtureRequest, lab_backend: str) -> Iterator[LabState]:
    prefix = f"mhtX{secrets.token_hex(2)}-"
    mode = ReturnMode(request.param)
    names: list[str] = []
    try:
        topo = describe(4, 2, prefix=prefix, transparent=mode)
        state = build.build(topo, backend=lab_backend)
        names = list(state.namespaces)
        wait_converged(state, state.topology.members)
        yield state
    finally:
        clean(prefix)
        assert not state_dir(prefix).exists()
        assert lab_namespaces(prefix) == []
        assert pids_in_namespaces(names) == {}


def assert_transparent(r: ProbeResult, n: int) -> None:
    """Every flow answered by its predicted node through a back end that saw the client's
    own address; no reply reached a node that did not hold the connection."""
    assert (r.failed, r.reset, r.timeout, r.duplicated, r.mispredicted) == (0, 0, 0, 0, 0), (
        r.to_dict()
    )
    t = r.transparency
    assert t is not None
    assert sum(r.answered.values()) == n
    assert t["seen_client"] == n and (t["seen_other"], t["no_backend"]) == (0, 0), t
    assert sum(t["backends"].values()) == n and all(t["backends"].values()), t
    logs = t["backend_log"]
    assert sum(v["requests"] for v in logs.values()) == n, logs
    assert all(v["client"] == v["requests"] and v["other"] == 0 for v in logs.values()), logs
    assert t["stray_replies"] == 0, t["replies"]
    assert all(v["held"] > 0 for v in t["replies"].values()), t["replies"]
    assert r.ok


def test_3000_connections_reach_the_back_ends_with_the_client_address(lab: LabState) -> None:
    r = run_probe(lab, "tcp", 3000, port_seed=11)
    assert_transparent(r, 3000)
    assert set(r.answered) == {"A", "B", "C", "D"}
    assert r.to_dict()["transparency"]["return"] == lab.topology.backnet.mode.value  # type: ignore[union-attr]


def test_each_flow_reports_node_back_end_and_the_client_address_seen(lab: LabState) -> None:
    r = run_probe(lab, "tcp", 40, port_seed=12, flows=True)
    assert r.flows is not None and len(r.flows) == 40
    for f in r.flows:
        assert f["outcome"] == "answered" and f["node"] == f["expected"], f
        assert f["backend"] in ("b1", "b2")
        client, _, port = f["flow"].rpartition(":")
        seen_addr, _, seen_port = f["seen"].rpartition(":")
        assert seen_addr == client, f
        bn = lab.topology.backnet
        assert bn is not None
        if bn.mode is ReturnMode.GATEWAY:
            assert seen_port == port, f


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def _ip(netns: str, *args: str) -> str:
    return subprocess.run(
        ["ip", "-n", netns, *args], capture_output=True, text=True, check=True
    ).stdout


def test_a_single_default_route_on_a_back_end_is_caught_as_stray_replies(lab: LabState) -> None:
    """The counter can fail: b1 replying through node A only (an ordinary default route
    instead of its per-node return routes or the return traffic IP) breaks the
    connections other nodes send to b1, and their replies are counted as stray on A."""
    bn = lab.topology.backnet
    assert bn is not None
    b1 = bn.backends[0]
    config = str(lab.agents["config"])
    routes = bn.mode is ReturnMode.ROUTES
    if routes:
        removed = backbuild.backend_routes(b1.netns, config, b1.name, "--remove")
        assert removed["ok"] and removed["changed"] == 3 * len(lab.topology.members), removed
    try:
        # b1 keeps one address for every node (the proxies connect to it), routes by none
        for _, address in b1.node_addresses:
            _ip(b1.netns, "addr", "add", f"{address}/{bn.prefixlen}", "dev", b1.interface)
        _ip(b1.netns, "route", "replace", "default", "via", bn.gateway("A"))
        r = run_probe(lab, "tcp", 400, port_seed=13, timeout=6.0)
        t = r.transparency
        assert t is not None
        assert t["replies"]["A"]["stray"] > 0, t
        assert all(t["replies"][n]["stray"] == 0 for n in ("B", "C", "D")), t
        assert r.unanswered_by_expected and "A" not in r.unanswered_by_expected, r.to_dict()
        assert not r.ok
    finally:
        if routes:
            _ip(b1.netns, "route", "del", "default")
        else:
            _ip(b1.netns, "route", "replace", "default", "via", str(bn.return_vip))
        for _, address in b1.node_addresses:
            subprocess.run(
                ["ip", "-n", b1.netns, "addr", "del", f"{address}/{bn.prefixlen}", "dev",
                 b1.interface],
                capture_output=True, check=False,
            )  # fmt: skip
        if routes:
            applied = backbuild.backend_routes(b1.netns, config, b1.name, "--apply")
            assert applied["ok"], applied
        # b1 still retransmits SYN-ACKs of the connections that broke (for a minute), now
        # to the right nodes, whose proxies gave up on them: they would count as stray.
        ns = ["ip", "netns", "exec", b1.netns, "ss", "-Htn", "state", "syn-recv"]
        subprocess.run([*ns[:-2], "-K", "state", "syn-recv"], capture_output=True, check=False)
        wait_until(lambda: not _run(ns).stdout.strip())
    assert_transparent(run_probe(lab, "tcp", 1000, port_seed=14), 1000)


def test_fail_and_recover_during_a_probe_lose_only_that_nodes_connections(
    lab: LabState, lab_backend: str
) -> None:
    # nft: a crashed agent's owner table goes with it, the node stops at once.  XDP: the
    # program outlives a crashed agent until its kernel lease lapses (by design), so the
    # node is cut off instead (link down: it serves nothing, in either direction).
    how = "crash" if lab_backend == "nft" else "link"
    results: list[ProbeResult] = []
    errors: list[BaseException] = []
    done = [0]  # flows finished so far (the probe reports about once a second)

    def progress(n: int, _total: int) -> None:
        done[0] = n

    def probe() -> None:
        # paced (8,000 flows at <= 800/s: >= 10 s) so that the failure falls inside the
        # probe however fast the machine; unpaced, a fast host finished before D was down
        try:
            r = run_probe(
                lab, "tcp", 8000, port_seed=15, concurrency=16, timeout=5.0, flows=True, rate=800,
                progress=progress,
            )  # fmt: skip
            results.append(r)
        except BaseException as e:  # re-raised in the test thread
            errors.append(e)

    t = threading.Thread(target=probe)
    t.start()
    try:
        wait_until(lambda: done[0] >= 500 or not t.is_alive(), timeout=30)
        faults.fail(lab, "D", how)
        at_fail = done[0]
        wait_converged(lab, ["A", "B", "C"])
        # D stays failed while at least 1,000 more flows run (survivors serve D's share)
        wait_until(lambda: done[0] >= at_fail + 1000 or not t.is_alive(), timeout=60)
        faults.recover(lab, "D")
    finally:
        t.join(180)
    assert not errors, errors
    r = results[0]
    assert r.flows is not None
    others = [f for f in r.flows if f["expected"] != "D"]
    broken = [f for f in others if f["outcome"] != "answered" or f["node"] != f["expected"]]
    assert broken == [], (r.errors, broken[:5])
    ds = [f for f in r.flows if f["expected"] == "D"]
    moved = [f for f in ds if f["outcome"] != "answered" or f["node"] != "D"]
    assert moved, "the failure did not happen during the probe"
    assert set(r.unanswered_by_expected) <= {"D"}, r.unanswered_by_expected
    tr = r.transparency
    assert tr is not None and tr["seen_other"] == 0, tr
    bn = lab.topology.backnet
    assert bn is not None
    if bn.mode is ReturnMode.ROUTES:  # replies follow the node, never another one
        assert tr["stray_replies"] == 0, tr["replies"]
    wait_converged(lab, lab.topology.members, quiet=True, timeout=30)
    # From the other client: D's proxy still holds (for a minute, until nginx's send
    # timeout) the front sockets of c1's connections that broke under it, and a new
    # connection on the very same 4-tuple would meet them.
    assert_transparent(run_probe(lab, "tcp", 3000, port_seed=16, client="c2"), 3000)
