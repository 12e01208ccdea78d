"""Build a described lab (all-or-nothing) and tear it down; owns the lab's state file.

Owns: creating the lab's namespaces, the switch bridge (IGMP snooping per
:class:`topology.SwitchMode`), one veth pair per host (created inside the switch namespace
with its peer placed directly into the host's namespace, so nothing ever appears in the root
namespace), addresses and links, all through pyroute2 netlink; running the steps in order
(the nodes' services: :mod:`multihost.lab.services`; a router or back-end network:
:mod:`multihost.lab.backbuild`); spawning lab processes (``ip netns exec``, recorded by PID
and start time); calling :func:`multihost.lab.agents.start_agents`; and the state file
``/run/multihost-lab/<prefix>/state.json``, rewritten after every step so that
:func:`multihost.lab.clean.clean` can remove a half-built lab even after a crash.

Must not: put the traffic IP on a node, install the data plane's nft rules or answer ARP
(the agent does),
touch the root namespace's links, routes or firewall, or leave anything behind when a build
fails: :func:`build` tears down what it made and raises :class:`LabError` naming the step.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import multihost
from multihost.dataplane.nft import netns_entered
from multihost.lab import agents
from multihost.lab.clean import (
    CleanReport,
    lab_namespaces,
    proc_start_time,
    recorded_processes,
    remove_lab,
)
from multihost.lab.topology import (
    NETNS_DIR,
    PROBE_PORTS,
    SUBNET6,
    Host,
    Topology,
    TopologyError,
    state_dir,
)
from multihost.linkwatch import IF_INET6, dad_pending

STATE_FORMAT = 1
READY_TIMEOUT = 15.0
NGINX = "/usr/sbin/nginx"
#: The bridge querier's query response interval, in centiseconds (USER_HZ).
QUERY_RESPONSE_CS = 100


class LabError(Exception):
    """A lab operation failed (the message says which step and why); exit status 1."""


@dataclass
class ProcessRecord:
    """A process the lab started; ``match`` must appear in its command line to be stopped."""

    name: str
    host: str
    netns: str
    pid: int
    start_time: int
    match: str
    argv: list[str]
    log: str
    cmdline: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class LabState:
    """Everything a lab created or started, as saved in ``state.json``."""

    topology: Topology
    status: str = "building"  # "building" | "up"
    created: str = ""
    builder_pid: int = 0
    live: list[str] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    processes: list[ProcessRecord] = field(default_factory=list)
    agents: dict[str, Any] = field(default_factory=dict)
    step: str = ""

    @property
    def prefix(self) -> str:
        return self.topology.prefix

    @property
    def directory(self) -> Path:
        return state_dir(self.prefix)

    @property
    def path(self) -> Path:
        return self.directory / "state.json"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "prefix": self.prefix,
            "status": self.status,
            "step": self.step,
            "created": self.created,
            "builder_pid": self.builder_pid,
            "state_dir": str(self.directory),
            "topology": self.topology.to_dict(),
            "live": list(self.live),
            "namespaces": list(self.namespaces),
            "processes": [p.to_dict() for p in self.processes],
            "agents": self.agents,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabState:
        try:
            if d.get("format") != STATE_FORMAT:
                raise LabError(f"state format {d.get('format')!r} is not {STATE_FORMAT}")
            return cls(
                topology=Topology.from_dict(d["topology"]),
                status=str(d["status"]),
                created=str(d["created"]),
                builder_pid=int(d["builder_pid"]),
                live=[str(x) for x in d["live"]],
                namespaces=[str(x) for x in d["namespaces"]],
                processes=[ProcessRecord(**p) for p in d["processes"]],
                agents=dict(d.get("agents") or {}),
                step=str(d.get("step", "")),
            )
        except (KeyError, TypeError, ValueError, TopologyError) as e:
            raise LabError(f"malformed lab state: {e}") from None

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, self.path)


def load_state(prefix: str) -> LabState | None:
    """The saved state of the lab with ``prefix``, None if there is none."""
    try:
        text = (state_dir(prefix) / "state.json").read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise LabError(f"{state_dir(prefix)}/state.json is not JSON ({e})") from None
    return LabState.from_dict(data)


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces); run it with sudo")


# --- build ------------------------------------------------------------------------------

StepHook = Callable[[str], None]


def build(
    topology: Topology,
    progress: StepHook | None = None,
    *,
    manual: bool = False,
    with_agents: bool = True,
    heartbeat_ms: int | None = None,
    dead_after_ms: int | None = None,
    metrics: bool = False,
    quorum: bool = False,
    max_drain_ms: int | None = None,
    backend: str = "auto",
) -> LabState:
    """Create the lab, start its services and agents; all or nothing.

    ``heartbeat_ms``/``dead_after_ms``/``metrics``/``quorum``/``max_drain_ms``/``backend``:
    see :func:`agents.start_agents`.

    Raises :class:`LabError` if a lab with the prefix exists or a step fails; in the
    latter case everything built so far has been removed before the error is raised.
    """
    require_root()
    prefix = topology.prefix
    leftovers = lab_namespaces(prefix)
    if state_dir(prefix).exists() or leftovers:
        what = f"namespaces {', '.join(leftovers)}" if leftovers else str(state_dir(prefix))
        raise LabError(
            f"a lab with prefix {prefix!r} already exists ({what}); "
            "run 'multihost lab down' (or 'multihost lab clean' if it is broken) first"
        )
    state_dir(prefix).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        state_dir(prefix).mkdir(mode=0o755)
    except FileExistsError:
        raise LabError(f"a lab with prefix {prefix!r} is being built by another process") from None
    state = LabState(
        topology=topology,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        builder_pid=os.getpid(),
        live=list(topology.members),
        agents={"manual": manual},
    )
    timing: dict[str, object] = {
        "heartbeat_ms": heartbeat_ms,
        "dead_after_ms": dead_after_ms,
        "metrics": metrics,
    }
    timing.update(quorum=quorum, max_drain_ms=max_drain_ms, backend=backend)
    state.agents.update({k: v for k, v in timing.items() if v})
    steps: list[tuple[str, Callable[[LabState], None]]] = [
        ("creating namespaces", create_namespaces),
        ("configuring the switch", configure_switch),
        ("wiring hosts to the switch", wire_hosts),
        ("starting nginx and the UDP echo service", _start_services),
        ("waiting for IPv6 duplicate address detection", wait_dad),
        ("starting the agents", _start_agents),
    ]
    if not with_agents:  # the bare network (tests of the switch itself)
        steps.pop()
    from multihost.lab import backbuild

    steps[3:3] = backbuild.network_steps(topology)  # router, back-end network (or none)
    if with_agents:
        steps += backbuild.service_steps(topology)
    try:
        state.save()
        for step, func in steps:
            state.step = step
            if progress is not None:
                progress(step)
            func(state)
            state.save()
        state.status = "up"
        state.step = ""
        state.save()
    except BaseException as e:
        report = teardown(state, strict=False)
        if report.errors:
            undone = "clean-up FAILED (try 'multihost lab clean'): " + "; ".join(report.errors)
        else:
            undone = "everything built was removed"
        if not isinstance(e, Exception):
            raise
        what = str(e) if isinstance(e, LabError) else f"{type(e).__name__}: {e}"
        raise LabError(f"lab up failed while {state.step}: {what}; {undone}") from e
    return state


def _ipr(netns: str) -> Any:
    from pyroute2 import IPRoute

    # flags=0: never create a namespace implicitly (IPRoute's default is O_CREAT).
    return IPRoute(netns=netns, flags=0)


def _index(ipr: Any, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LabError(f"interface {ifname} not found")
    return int(found[0])


def add_veth(ipr: Any, port: str, ifname: str, netns: str, mac: str) -> int:
    """A veth pair: ``port`` here, ``ifname`` (with ``mac``) in ``netns``; ``port``'s index."""
    ipr.link(
        "add",
        ifname=port,
        kind="veth",
        peer={"ifname": ifname, "net_ns_fd": netns, "address": mac},
    )
    return _index(ipr, port)


def nft_script(netns: str, script: str) -> None:
    """Load an nft ``script`` (``nft -f -``) inside ``netns``; LabError with nft's complaint."""
    proc = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-f", "-"],
        input=script,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise LabError(f"nft in {netns} failed: {proc.stderr.strip()[-300:]}")


def create_namespaces(state: LabState) -> None:
    from pyroute2 import netns

    for name in state.topology.netns_names():
        if (NETNS_DIR / name).exists():
            raise LabError(f"namespace {name} already exists")
        state.namespaces.append(name)  # recorded first: a half-created one is removed too
        state.save()
        netns.create(name)


def configure_switch(state: LabState) -> None:
    sw = state.topology.switch
    with _ipr(sw.netns) as ipr:
        ipr.link("set", index=_index(ipr, "lo"), state="up")
        ipr.link(
            "add",
            ifname=sw.bridge,
            kind="bridge",
            br_mcast_snooping=int(sw.mcast_snooping),
            br_mcast_querier=0,
            # Enabling the querier starts a "querier delay" of one response interval during
            # which the bridge floods; 1 s (default 10 s) makes the mode hold soon after up.
            br_mcast_query_response_intvl=QUERY_RESPONSE_CS,
            br_nf_call_iptables=0,
            br_nf_call_ip6tables=0,
            br_nf_call_arptables=0,
        )
        bridge = _index(ipr, sw.bridge)
        if sw.mcast_querier:
            ipr.link("set", index=bridge, kind="bridge", br_mcast_querier=1)
        ipr.link("set", index=bridge, state="up")


def wire_hosts(state: LabState) -> None:
    topo = state.topology
    sw = topo.switch
    # A routed lab's clients hang off the router (backbuild.wire_router), not the switch.
    hosts = topo.hosts if topo.router is None else topo.nodes
    with _ipr(sw.netns) as ipr:
        bridge = _index(ipr, sw.bridge)
        for h in hosts:
            port = add_veth(ipr, h.switch_port, h.interface, h.netns, h.mac)
            ipr.link("set", index=port, master=bridge)
            if h.role == "node" and sw.node_ports_mrouter:
                ipr.brport("set", index=port, multicast_router=2)
            ipr.link("set", index=port, state="up")
    for h in hosts:
        configure_host(h)


def configure_host(h: Host) -> None:
    with _ipr(h.netns) as ipr:
        ipr.link("set", index=_index(ipr, "lo"), state="up")
        dev = _index(ipr, h.interface)
        for address in h.addresses:
            ipr.addr("add", index=dev, address=address, prefixlen=h.prefixlen)
        if h.addresses6:
            # 'lab fail --how link' sets the link down, which flushes IPv6 addresses (and
            # their connected route) unless keep_addr_on_down; a cable pull, which it
            # models, keeps them.
            sysctl(h.netns, f"net.ipv6.conf.{h.interface}.keep_addr_on_down", "1")
        for address in h.addresses6:  # no duplicate address detection: usable at once
            ipr.addr("add", index=dev, address=address, prefixlen=SUBNET6.prefixlen, flags=NODAD)
        # The connected route of the /16 is the only route a lab host needs.
        ipr.link("set", index=dev, state="up")
    if h.role == "client":  # (for IPv6 too) ephemeral ports outside the probes' range
        sysctl(h.netns, "net.ipv4.ip_local_port_range", f"{PROBE_PORTS[1]} 65535")


def sysctl(netns: str, key: str, value: str) -> None:
    """Set ``key`` (dotted) to ``value`` in namespace ``netns``."""
    with netns_entered(netns), open(f"/proc/sys/{key.replace('.', '/')}", "w") as f:
        f.write(value + "\n")


#: IFA_F_NODAD (<linux/if_addr.h>): the address skips duplicate address detection.
NODAD = 0x02


# --- services ---------------------------------------------------------------------------


class _Placed(Protocol):
    """Where a process runs: a host or back end's name and namespace."""

    @property
    def name(self) -> str: ...
    @property
    def netns(self) -> str: ...


def _spawn(
    state: LabState, host: _Placed, name: str, argv: list[str], *, match: str
) -> ProcessRecord:
    log = state.directory / f"{name}.log"
    env = dict(os.environ)
    src = str(Path(multihost.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives 'lab up', immune to the terminal's ^C
            env=env,
        )
    start = proc_start_time(proc.pid)
    if start is None:
        proc.wait()
        raise LabError(f"{name} exited at once (status {proc.returncode}); see {log}")
    rec = ProcessRecord(name, host.name, host.netns, proc.pid, start, match, argv, str(log))
    state.processes.append(rec)
    state.save()
    return rec


def _netns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def listening(pid: int, proto: str, port: int) -> bool:
    """Whether ``pid``'s network namespace has a socket bound to ``port`` (TCP: listening)."""
    try:
        lines = Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        cols = line.split()
        local, st = cols[1], cols[3]
        if int(local.rsplit(":", 1)[1], 16) == port and (proto == "udp" or st == "0A"):
            return True
    return False


def wait_listening(
    rec: ProcessRecord, proto: str, port: int, timeout: float = READY_TIMEOUT
) -> None:
    """Poll until ``rec`` runs inside its namespace and listens on ``port``."""
    want = _netns_inode(str(NETNS_DIR / rec.netns))
    deadline = time.monotonic() + timeout
    while True:
        if proc_start_time(rec.pid) != rec.start_time or _zombie(rec.pid):
            raise LabError(f"{rec.name} exited during start-up: {_tail(rec.log)}")
        in_ns = want is not None and _netns_inode(f"/proc/{rec.pid}/ns/net") == want
        if in_ns and listening(rec.pid, proto, port):
            return
        if time.monotonic() >= deadline:
            raise LabError(f"{rec.name} is not listening on {proto}/{port} after {timeout:.0f}s")
        time.sleep(0.02)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _tail(path: str, lines: int = 3) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return f"(no log {path})"
    return " | ".join(text[-lines:]) or f"(empty log {path})"


def _start_services(state: LabState) -> None:
    from multihost.lab import services

    services.start_services(state)


def wait_dad(state: LabState, timeout: float = 10.0) -> None:
    """Until every node's cluster interface has a usable link-local address (dual stack).

    An agent started while DAD runs stays fenced until it ends (``linkwatch.py``) and then
    joins late, which moves its share through a handover right after ``lab up``; a booted
    host has finished DAD long before its agent starts."""
    if not state.topology.ipv6:
        return
    deadline = time.monotonic() + timeout
    for h in state.topology.nodes:
        while True:
            text = subprocess.run(
                ["ip", "netns", "exec", h.netns, "cat", IF_INET6],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            if not dad_pending(text, h.interface):
                break
            if time.monotonic() > deadline:
                raise LabError(f"node {h.name}: DAD on {h.interface} did not end in {timeout:g}s")
            time.sleep(0.05)


def _start_agents(state: LabState) -> None:
    a = state.agents
    manual = bool(a.get("manual", False))
    result = agents.start_agents(
        state.topology,
        state,
        manual=manual,
        interval_ms=a.get("heartbeat_ms"),
        dead_after_ms=a.get("dead_after_ms"),
        metrics=bool(a.get("metrics", False)),
        quorum=bool(a.get("quorum", False)),
        max_drain_ms=a.get("max_drain_ms"),
        backend=str(a.get("backend") or "auto"),
    )
    state.agents = dict(result or {})


# --- status and teardown ----------------------------------------------------------------


def process_alive(rec: ProcessRecord) -> bool:
    return proc_start_time(rec.pid) == rec.start_time and not _zombie(rec.pid)


def teardown(state: LabState, strict: bool = True) -> CleanReport:
    """Stop every recorded process (agents first), delete the namespaces and the state dir.

    With ``strict``, raises :class:`LabError` if anything could not be removed.
    """
    records = recorded_processes(
        {"processes": [p.to_dict() for p in state.processes], "agents": state.agents}
    )
    report = remove_lab(state.prefix, records, state.namespaces)
    if strict and report.errors:
        raise LabError("lab down left things behind: " + "; ".join(report.errors))
    return report


def set_live(state: LabState, live: list[str]) -> None:
    """Tell the agents the new live set (:func:`agents.push_live`), then record it."""
    unknown = [n for n in live if n not in state.topology.members]
    if unknown:
        members = ",".join(state.topology.members)
        raise LabError(f"unknown node {unknown[0]!r} (nodes: {members})")
    if len(set(live)) != len(live):
        raise LabError("a node is listed twice")
    agents.push_live(state, list(live))
    state.live = [m for m in state.topology.members if m in live]
    state.save()
