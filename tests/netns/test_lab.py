"""Root tests of the lab: build, serve, probe, tear down, fail midway, clean after a crash.

Every test uses its own prefix (``mhtL<random>-``) and a fixture that runs
:func:`multihost.lab.clean.clean` afterwards, so a failing test leaves nothing behind.
No data plane exists here, so probes target the nodes' own addresses; the switch test puts
the traffic IP on the nodes itself, standing in for the agent.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from multihost.lab import agents, build, processes, wiring
from multihost.lab.clean import clean, pids_in_namespaces, proc_start_time
from multihost.lab.naming import state_dir
from multihost.lab.probe import ProbeResult, run_probe
from multihost.lab.state import LabError, LabState, ProcessRecord
from multihost.lab.topology import PROBE_PORTS, SwitchMode, Topology, describe

CLI = [sys.executable, "-c", "from multihost.cli import entry; entry()"]


def new_prefix() -> str:
    return f"mhtL{secrets.token_hex(3)}-"


def netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def leftovers(prefix: str) -> list[str]:
    found = [n for n in netns_list() if n.startswith(prefix)]
    if state_dir(prefix).exists():
        found.append(str(state_dir(prefix)))
    return found


def alive(pid: int, start: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap if it is our child (the test started the lab)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return stat[0] != "Z" and proc_start_time(pid) == start


def wait_until(cond: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def lab_pids(state: LabState) -> dict[int, int]:
    """Every process in the lab's namespaces (nginx workers included): pid -> start time."""
    pids = pids_in_namespaces(state.namespaces)
    return {p: s for p in pids if (s := proc_start_time(p)) is not None}


@pytest.fixture
def prefix() -> Iterator[str]:
    p = new_prefix()
    yield p
    clean(p)
    assert leftovers(p) == []


def up(prefix: str, nodes: int = 3, with_agents: bool = True, **kw: Any) -> LabState:
    return build.build(describe(nodes, prefix=prefix, **kw), with_agents=with_agents)


def curl(netns: str, url: str) -> str:
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "curl", "-sS", "--max-time", "5", url],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def test_every_node_serves_from_its_address_and_down_leaves_nothing(prefix: str) -> None:
    state = up(prefix, nodes=3)
    topo = state.topology
    assert set(topo.netns_names()) <= set(netns_list())
    assert state.path.exists() and json.loads(state.path.read_text())["status"] == "up"
    assert len(state.processes) == 6
    assert all(processes.process_alive(p) for p in state.processes)
    client = topo.clients[0]
    # curl's own source ports never fall in the probes' range: a probe flow on the port of
    # the curl just before (its TIME_WAIT) failed to connect (EADDRNOTAVAIL) once in CI
    ephemeral = subprocess.run(
        ["ip", "netns", "exec", client.netns, "cat", "/proc/sys/net/ipv4/ip_local_port_range"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert [int(x) for x in ephemeral] == [PROBE_PORTS[1], 65535]
    for node in topo.nodes:
        assert curl(client.netns, f"http://{node.address}/").splitlines()[0] == node.name
        res = run_probe(state, "tcp", 300, target=node.address, concurrency=100)
        assert res.answered == {node.name: 300}, res.to_dict()
        assert (res.failed, res.reset, res.timeout, res.mispredicted) == (0, 0, 0, 0)
        assert res.predicted == {node.name: 300}
    udp = run_probe(state, "udp", 100, target=topo.nodes[1].address)
    assert udp.answered == {"B": 100} and udp.duplicated == 0 and udp.ok
    icmp = run_probe(state, "icmp", 40, target=topo.nodes[2].address)
    assert icmp.answered == {"C": 40} and icmp.ok
    everything = lab_pids(state)
    assert len(everything) > len(state.processes)  # nginx workers too
    report = build.teardown(state)
    assert report.errors == []
    assert sorted(report.namespaces) == sorted(topo.netns_names())
    assert leftovers(prefix) == []
    assert not [p for p, s in everything.items() if alive(p, s)]


def test_probe_refused_port_counts_as_reset(prefix: str) -> None:
    state = up(prefix, nodes=1)
    node = state.topology.nodes[0]
    # Stop nginx (by its record): connections to port 80 are then refused.
    nginx = next(p for p in state.processes if p.name == "nginx-A")
    os.kill(nginx.pid, signal.SIGTERM)
    wait_until(lambda: not alive(nginx.pid, nginx.start_time), what="nginx to stop")
    wait_until(
        lambda: not processes.listening(_any_pid_in(node.netns), "tcp", 80), what="no listener"
    )
    res = run_probe(state, "tcp", 50, target=node.address)
    assert res.reset == 50 and res.answered == {} and not res.ok


def _any_pid_in(netns: str) -> int:
    return next(iter(pids_in_namespaces([netns])))


def _fail_configure_host(real: Any) -> Any:
    def fake(h: Any) -> None:
        if h.name == "B":
            raise OSError("injected failure configuring B")
        real(h)

    return fake


@pytest.mark.parametrize("where", ["wiring", "services", "agents"])
def test_failure_midway_leaves_nothing(
    prefix: str, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: dict[int, int] = {}
    if where == "wiring":
        monkeypatch.setattr(wiring, "configure_host", _fail_configure_host(wiring.configure_host))
        step = "wiring hosts"
    elif where == "services":
        real_wait = processes.wait_listening

        def fake_wait(rec: ProcessRecord, proto: str, port: int, timeout: float = 5.0) -> None:
            started[rec.pid] = rec.start_time
            if len(started) == 3:
                raise OSError("injected failure waiting for a service")
            real_wait(rec, proto, port, timeout)

        monkeypatch.setattr(processes, "wait_listening", fake_wait)
        step = "starting nginx"
    else:

        def fake_agents(topology: Topology, state: LabState, *_: Any, **__: Any) -> dict[str, Any]:
            started.update(lab_pids(state))
            raise RuntimeError("injected agent failure")

        monkeypatch.setattr(agents, "start_agents", fake_agents)
        step = "starting the agents"
    with pytest.raises(LabError, match=f"while {step}.*injected.*everything built was removed"):
        up(prefix, nodes=3)
    assert leftovers(prefix) == []
    if where != "wiring":
        assert started, "the failure was injected after processes started"
    assert not [p for p, s in started.items() if alive(p, s)]


def test_clean_removes_a_lab_whose_processes_were_killed(prefix: str) -> None:
    state = up(prefix, nodes=2)
    everything = lab_pids(state)
    recorded = {p.pid: p.start_time for p in state.processes}
    for pid in recorded:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not any(alive(p, s) for p, s in recorded.items()), what="SIGKILL")
    orphans = {p: s for p, s in everything.items() if p not in recorded and alive(p, s)}
    assert orphans, "nginx workers outlive a SIGKILLed master"
    assert json.loads(state.path.read_text())["status"] == "up"  # the state file still claims it

    bystander = new_prefix()
    other = up(bystander, nodes=1)
    try:
        report = clean(prefix)
        assert report.errors == []
        assert sorted(report.namespaces) == sorted(state.namespaces)
        assert str(state.directory) in report.paths
        assert len(report.skipped) == len(recorded)  # exited: never signalled
        assert len(report.stopped) >= len(orphans)
        assert leftovers(prefix) == []
        assert not [p for p, s in orphans.items() if alive(p, s)]
        # The lab with another prefix is untouched.
        assert set(other.topology.netns_names()) <= set(netns_list())
        assert all(processes.process_alive(p) for p in other.processes)
        again = clean(prefix)
        assert not again.removed_anything and again.errors == []
    finally:
        clean(bystander)
    assert leftovers(bystander) == []


def test_clean_leaves_names_that_only_share_the_prefix(prefix: str) -> None:
    from pyroute2 import netns

    decoy = f"{prefix}scratch"
    netns.create(decoy)
    try:
        up(prefix, nodes=1)
        report = clean(prefix)
        assert decoy not in report.namespaces and decoy in netns_list()
        assert leftovers(prefix) == [decoy]
    finally:
        netns.remove(decoy)


def test_up_twice_fails_and_keeps_the_first_lab(prefix: str) -> None:
    state = up(prefix, nodes=1)
    with pytest.raises(LabError, match="already exists"):
        up(prefix, nodes=2)
    assert all(processes.process_alive(p) for p in state.processes)
    assert set(state.namespaces) <= set(netns_list())


def _stand_in_for_the_agent(topo: Topology) -> None:
    """Put the traffic IP on every node and point the client at the group MAC."""
    from pyroute2 import IPRoute

    for node in topo.nodes:
        with IPRoute(netns=node.netns, flags=0) as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname="lo")[0], address=topo.vip, prefixlen=32)
    client = topo.clients[0]
    with IPRoute(netns=client.netns, flags=0) as ipr:
        dev = ipr.link_lookup(ifname=client.interface)[0]
        ipr.neigh("add", dst=topo.vip, lladdr=topo.group_mac, ifindex=dev, state=0x80)


def _set_mrouter(topo: Topology, port: str, value: int) -> None:
    from pyroute2 import IPRoute

    with IPRoute(netns=topo.switch.netns, flags=0) as ipr:
        ipr.brport("set", index=ipr.link_lookup(ifname=port)[0], multicast_router=value)


def _only_b(res: ProbeResult) -> bool:
    return res.answered == {"B": res.connections} and res.duplicated == 0


@pytest.mark.parametrize("mode", list(SwitchMode))
def test_switch_delivers_traffic_ip_frames_per_mode(prefix: str, mode: SwitchMode) -> None:
    state = up(prefix, nodes=2, with_agents=False, switch_mode=mode)
    _stand_in_for_the_agent(state.topology)
    topo = state.topology
    # A bridge with a querier floods until the querier's start-up delay (1 s) has passed.
    if mode is SwitchMode.STRICT:
        wait_until(
            lambda: run_probe(state, "udp", 3, timeout=0.2).timeout == 3,
            timeout=15,
            what="the querier to take effect",
        )
    elif mode is SwitchMode.SNOOPING:
        # Only node ports being multicast-router ports gets the frames to the nodes: while
        # A's port is not one, A receives nothing (once the querier is in effect).
        _set_mrouter(topo, topo.nodes[0].switch_port, 0)
        wait_until(
            lambda: _only_b(run_probe(state, "udp", 3, timeout=0.5)),
            timeout=15,
            what="A to stop receiving",
        )
        _set_mrouter(topo, topo.nodes[0].switch_port, 2)
    res = run_probe(state, "udp", 30, timeout=1.0)
    if mode is SwitchMode.STRICT:
        assert res.timeout == 30 and res.answered == {}
    else:
        # No data plane: every node receives every frame, so every node answers.
        assert sum(res.answered.values()) == 30 and res.duplicated == 30


def cli(prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MULTIHOST_LAB_PREFIX": prefix}
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def test_cli_session(prefix: str) -> None:
    r = cli(prefix, "lab", "up", "--nodes", "2", "--seed", "0x5eed1234", "--manual", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["seed"] == "0x5eed1234" and out["members"] == ["A", "B"]
    assert out["client_netns"] == f"{prefix}c1" and out["nodes"]["B"]["netns"] == f"{prefix}B"
    assert {"vip", "port", "buckets"} <= set(out)
    again = cli(prefix, "lab", "up", "--nodes", "2")
    assert again.returncode == 1 and "already exists" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    status = cli(prefix, "lab", "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["healthy"] is True
    live = cli(prefix, "lab", "set-live", "B", "--json")
    assert live.returncode == 0 and json.loads(live.stdout)["live"] == ["B"]
    assert json.loads((state_dir(prefix) / "state.json").read_text())["live"] == ["B"]
    bad = cli(prefix, "lab", "set-live", "A,Q")
    assert bad.returncode == 2 and "unknown node 'Q'" in bad.stderr
    probe = cli(prefix, "lab", "probe", "--target", "198.18.0.12", "--connections", "100",
                "--json", "--check")  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    result = json.loads(probe.stdout)
    assert result["answered"] == {"B": 100} and result["connections"] == 100
    assert {"failed", "reset", "timeout", "mispredicted"} <= set(result)
    ex = cli(prefix, "lab", "exec", "c1", "--", "curl", "-s", "http://198.18.0.11/")
    assert ex.returncode == 0 and ex.stdout.splitlines()[0] == "A"
    assert cli(prefix, "lab", "exec", "A", "--", "sh", "-c", "exit 3").returncode == 3
    assert cli(prefix, "lab", "exec", "Z", "--", "true").returncode == 2
    down = cli(prefix, "lab", "down", "--json")
    assert down.returncode == 0, down.stderr
    assert len(json.loads(down.stdout)["namespaces"]) == 4
    assert leftovers(prefix) == []
    assert cli(prefix, "lab", "status").returncode == 1
