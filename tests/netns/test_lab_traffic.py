"""Real packets through the real data plane: a 4-node lab with agents in manual mode.

One lab per module (building takes ~2 s); every test leaves the lab as it found it (all
live).  The fixture removes everything even when a test fails.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from multihost.control import ControlError, request
from multihost.lab import agents, build
from multihost.lab.clean import clean
from multihost.lab.naming import state_dir
from multihost.lab.probe import ProbeResult, run_probe
from multihost.lab.state import LabState
from multihost.lab.topology import describe


def wait_until(cond: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _sigkill_xdp(lab: LabState, pid: int) -> None:
    """XDP backend: the program stays attached and pinned after SIGKILL; its kernel lease
    (manual mode: renewed every second for 3 s) lapses and D takes no new flow; 'multihost
    cleanup' then detaches and unpins it."""
    from multihost.dataplane.xdpattach import pinned_lease_held

    d = lab.topology.host("D")
    pins = agents.bpffs_dir(lab) / f"{lab.topology.prefix.rstrip('-')}-D"
    assert pinned_lease_held(pins)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not pinned_lease_held(pins), 5, "D's kernel lease to lapse")
    assert "xdp" in _link(d.netns, d.interface)  # still filtering: others' buckets dropped
    for proto, n in (("tcp", 400), ("udp", 400)):
        r = run_probe(lab, proto, n, port_seed=8, timeout=1.0)
        assert "D" not in r.answered, r.to_dict()
        assert r.duplicated == 0
        assert r.timeout + r.failed == r.predicted.get("D", 0), r.to_dict()
    cfg = lab.agents["config"]
    out = subprocess.run(
        ["ip", "netns", "exec", d.netns, *CLI, "cleanup", "--config", cfg, "--node", "D",
         "--control-socket", str(agents.control_socket(lab, "D")), "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    done = json.loads(out.stdout)
    assert done["xdp"]["detached"] and done["xdp"]["unpinned"], done
    assert done["addresses_removed"] == [str(lab.topology.vip)], done
    assert "xdp" not in _link(d.netns, d.interface) and not pins.exists()


def _link(netns: str, dev: str) -> str:
    return subprocess.run(
        ["ip", "-n", netns, "link", "show", dev], capture_output=True, text=True, check=True
    ).stdout


CLI = (sys.executable, "-m", "multihost")


@pytest.fixture(scope="module")
def lab(lab_backend: str) -> Iterator[LabState]:
    prefix = f"mhtT{secrets.token_hex(2)}-"
    try:
        state = build.build(describe(4, prefix=prefix), manual=True, backend=lab_backend)
        assert set(state.agents["dataplane"].values()) == {lab_backend}
        yield state
    finally:
        clean(prefix)
        assert not state_dir(prefix).exists()


def assert_clean(r: ProbeResult, n: int) -> None:
    assert r.connections == n
    assert (r.failed, r.reset, r.timeout, r.duplicated) == (0, 0, 0, 0), r.to_dict()
    assert r.mispredicted == 0, r.to_dict()
    assert sum(r.answered.values()) == n


def test_tcp_3000_connections_each_answered_by_the_predicted_node(lab: LabState) -> None:
    r = run_probe(lab, "tcp", 3000, port_seed=1)
    assert_clean(r, 3000)
    assert set(r.answered) == {"A", "B", "C", "D"}
    # 3000 flows over 4 equal shares: each share within 4 sigma of 750
    assert all(abs(v - 750) < 4 * (3000 * 0.25 * 0.75) ** 0.5 for v in r.answered.values())


def test_udp_echo_answered_once_by_the_predicted_node(lab: LabState) -> None:
    assert_clean(run_probe(lab, "udp", 1000, port_seed=2), 1000)


def test_icmp_echo_answered_by_exactly_one_node(lab: LabState) -> None:
    r = run_probe(lab, "icmp", 200, port_seed=3, sources=16)
    assert_clean(r, 200)
    assert len(r.answered) >= 2  # 16 source addresses spread over several nodes


def test_arp_answer_is_the_multicast_mac_never_a_node_mac(lab: LabState) -> None:
    topo = lab.topology
    c = topo.clients[0]
    ns = ["ip", "netns", "exec", c.netns]
    subprocess.run([*ns, "ip", "neigh", "flush", "dev", c.interface], check=True)
    out = subprocess.run(
        [*ns, "arping", "-c", "2", "-w", "3", "-I", c.interface, topo.vip],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "bytes from" in out.stdout, out.stdout + out.stderr
    run_probe(lab, "tcp", 50, port_seed=4)
    neigh = json.loads(
        subprocess.run(
            [*ns, "ip", "-j", "neigh", "show", topo.vip], capture_output=True, text=True, check=True
        ).stdout
    )
    macs = {e.get("lladdr") for e in neigh}
    assert macs == {topo.group_mac}
    assert not macs & {n.mac for n in topo.nodes}


def test_set_live_during_a_probe_loses_nothing(lab: LabState) -> None:
    results: list[ProbeResult] = []
    t = threading.Thread(
        target=lambda: results.append(run_probe(lab, "tcp", 4000, port_seed=5, concurrency=50))
    )
    t.start()
    try:
        time.sleep(0.3)  # let the probe get going (not synchronisation: any time works)
        build.set_live(lab, ["A", "B", "C"])
    finally:
        t.join(120)
    r = results[0]
    assert (r.failed, r.reset, r.timeout, r.duplicated) == (0, 0, 0, 0), r.to_dict()
    after = run_probe(lab, "tcp", 2000, port_seed=6)
    assert_clean(after, 2000)
    assert "D" not in after.answered
    build.set_live(lab, ["A", "B", "C", "D"])
    assert_clean(run_probe(lab, "tcp", 1000, port_seed=7), 1000)


def test_sigkill_of_the_agent_stops_its_node_at_once(lab: LabState, lab_backend: str) -> None:
    rec = agents.agent_record(lab, "D")
    assert rec is not None
    d = lab.topology.host("D")
    if lab_backend == "xdp":
        _sigkill_xdp(lab, int(rec["pid"]))
        return
    os.kill(int(rec["pid"]), signal.SIGKILL)

    def table_gone() -> bool:
        out = subprocess.run(
            ["ip", "netns", "exec", d.netns, "nft", "list", "tables"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return "inet multihost\n" not in out + "\n" and "multihost_guard" in out

    wait_until(table_gone, 5, "the owner table of D to vanish")
    # D's share is now served by nobody (manual mode: nobody took it); D answers nothing.
    for proto, n in (("tcp", 400), ("udp", 400)):
        r = run_probe(lab, proto, n, port_seed=8, timeout=1.0)
        assert "D" not in r.answered, r.to_dict()
        assert r.duplicated == 0
        assert r.timeout + r.failed == r.predicted.get("D", 0), r.to_dict()
    sock = agents.control_socket(lab, "D")
    with pytest.raises(ControlError):
        request(sock, "status", timeout=0.5)
