"""Namespaces, veths and kernel counters for the data-plane benchmark (bench only).

Owns: the ``mhtB-<pid>-<role>`` namespaces (created here, always deleted by :class:`Lab`'s
``close``, stale ones of dead benchmark processes removed first), the veth pairs between
the sender namespace and one receiver namespace per variant, the emulated-NIC wires and
client namespaces of :meth:`Lab.wire`, their 198.18.0.0/15 addresses,
the per-namespace readings the benchmark needs (``/proc/net/snmp``, ``/proc/net/dev``),
CPU readings (``/proc/stat``, ``/proc/<pid>/schedstat``) and iperf3 processes started here
(stopped by PID).

Must not: touch the root namespace's interfaces, addresses, routes or firewall, or any
namespace it did not create; kill processes it did not start.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from bench import bpfgen
from multihost.dataplane.nft import netns_entered

PREFIX = "mhtB-"
SO_RCVBUFFORCE = 33


def run(*args: str, check: bool = True, stdin: str | None = None) -> str:
    proc = subprocess.run(
        list(args), input=stdin, capture_output=True, text=True, timeout=120, check=False
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def ns_run(ns: str, *args: str, check: bool = True, stdin: str | None = None) -> str:
    assert ns.startswith(PREFIX), ns
    return run("ip", "netns", "exec", ns, *args, check=check, stdin=stdin)


def ip_batch(ns: str, commands: list[str]) -> None:
    assert ns.startswith(PREFIX), ns
    run("ip", "-n", ns, "-batch", "-", stdin="\n".join(commands) + "\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> None:
    """Delete ``mhtB-<pid>-...`` namespaces whose benchmark process is gone."""
    for line in run("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        parts = name.split("-")
        ours = name.startswith(PREFIX) and len(parts) >= 3 and parts[1].isdigit()
        if ours and not _alive(int(parts[1])):
            run("ip", "netns", "delete", name, check=False)


def mount_bpffs() -> Path:
    """A BPF filesystem of the benchmark's own, in a fresh temporary directory (a fresh
    machine has none at /sys/fs/bpf; the host's mounts are not touched)."""
    d = Path(tempfile.mkdtemp(prefix=f"{PREFIX}bpffs-"))
    run("mount", "-t", "bpf", "bpf", str(d))
    return d


def unmount_bpffs(d: Path) -> None:
    """Unmount (lazily: frees whatever is still pinned) and remove :func:`mount_bpffs`'s."""
    run("umount", "-l", str(d), check=False)
    with suppress(OSError):
        d.rmdir()


def read_in(ns: str, path: str) -> str:
    """A ``/proc/thread-self/net/...`` file as seen from namespace ``ns``."""
    with netns_entered(ns), open(f"/proc/thread-self/net/{path}") as f:
        return f.read()


def snmp(ns: str) -> dict[str, int]:
    """``Ip``/``Udp``/``Tcp`` counters of ``ns`` as ``"Ip.InReceives"`` etc."""
    out: dict[str, int] = {}
    lines = read_in(ns, "snmp").splitlines()
    for head, vals in zip(lines[::2], lines[1::2], strict=False):
        proto, names = head.split(":", 1)
        _, values = vals.split(":", 1)
        for k, v in zip(names.split(), values.split(), strict=True):
            if proto in ("Ip", "Udp", "Tcp"):
                out[f"{proto}.{k}"] = int(v)
    return out


def dev_counters(ns: str, dev: str) -> dict[str, int]:
    for line in read_in(ns, "dev").splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == dev:
            f = [int(x) for x in rest.split()]
            return {"rx_packets": f[1], "rx_dropped": f[3], "tx_packets": f[9], "tx_dropped": f[11]}
    raise KeyError(dev)


def cpu_times(cpu: int | None) -> dict[str, int]:
    """``/proc/stat`` line of one CPU (None: all CPUs) in USER_HZ ticks."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    prefix = "cpu " if cpu is None else f"cpu{cpu} "
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(prefix):
                return dict(zip(names, (int(x) for x in line.split()[1:9]), strict=True))
    raise KeyError(cpu)


def ksoftirqd_pid(cpu: int) -> int:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with suppress(OSError), open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == f"ksoftirqd/{cpu}":
                    return int(pid)
    raise LookupError(f"ksoftirqd/{cpu}")


def task_ns(pid: int) -> int:
    """CPU time of a task in ns (``/proc/<pid>/schedstat`` first field)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def mac_of(ns: str, dev: str) -> bytes:
    link = json.loads(ns_run(ns, "ip", "-j", "link", "show", "dev", dev))[0]
    return bytes.fromhex(str(link["address"]).replace(":", ""))


def ifindex_of(ns: str, dev: str) -> int:
    with netns_entered(ns):
        return socket.if_nametoindex(dev)


@dataclass
class Lab:
    """One sender namespace and a receiver namespace per variant, each joined by a veth.

    Receiver ``i`` (1-based): ``s-<role>`` 198.18.i.1/24 in the sender namespace,
    ``r0`` 198.18.i.2/24 plus the traffic IP on the receiver side, GRO on (veth then
    receives in NAPI mode, which XDP redirects into it need), a route back to the
    generated client pool, and a UDP socket bound to ``vip:dport`` that is never read
    (delivered datagrams end as ``RcvbufErrors``: a fixed, cheap sink).
    """

    vip: str
    dport: int
    pool: str
    sender: str = ""
    receivers: dict[str, str] = field(default_factory=dict)
    index: dict[str, int] = field(default_factory=dict)
    sinks: list[socket.socket] = field(default_factory=list)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    clients: list[str] = field(default_factory=list)  # namespaces made by wire()
    fds: list[int] = field(default_factory=list)  # wire programs and their links
    wire_to_node: dict[str, int] = field(default_factory=dict)  # role: that program's fd

    def open(self, roles: list[str]) -> None:
        cleanup_stale()
        self.sender = f"{PREFIX}{os.getpid()}-snd"
        run("ip", "netns", "add", self.sender)
        ip_batch(self.sender, ["link set lo up"])
        for sysctl in ("net.ipv4.tcp_tw_reuse=1",):
            ns_run(self.sender, "sysctl", "-qw", sysctl)
        for role in roles:
            self.add(role)

    def add(self, role: str) -> str:
        """One more receiver namespace (index = the next number); its name."""
        i = len(self.index) + 1
        ns = f"{PREFIX}{os.getpid()}-{role}"
        run("ip", "netns", "add", ns)
        self.receivers[role] = ns
        self.index[role] = i
        run(
            "ip", "-n", self.sender, "link", "add", f"s-{role}", "type", "veth",
            "peer", "name", "r0", "netns", ns,
        )  # fmt: skip
        ip_batch(self.sender, [f"addr add 198.18.{i}.1/24 dev s-{role}", f"link set s-{role} up"])
        ip_batch(
            ns,
            [
                "link set lo up",
                f"addr add 198.18.{i}.2/24 dev r0",
                f"addr add {self.vip}/32 dev r0",
                "link set r0 up",
                f"route add {self.pool} via 198.18.{i}.1",
            ],
        )
        ns_run(ns, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0")
        ns_run(ns, "sysctl", "-qw", "net.ipv4.conf.r0.rp_filter=0")
        ns_run(ns, "ethtool", "-K", "r0", "gro", "on")
        with netns_entered(ns):
            sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sink.bind((self.vip, self.dport))
        self.sinks.append(sink)
        return ns

    def wire(self, role: str, neigh_mac: str | None) -> str:
        """Turn ``role``'s veth into the far end of an emulated NIC; the client namespace.

        A client namespace ``c-<role>`` gets ``c0`` (198.18.i.1/24, the traffic IP routed
        out of it; ``neigh_mac`` as in :meth:`tcp_route`), whose peer ``w-<role>`` sits in
        the sender namespace beside ``s-<role>``.  Two one-line XDP programs
        (:func:`bench.bpfgen.load_redirect_program`) cross-connect ``w-<role>`` and
        ``s-<role>``, so every frame reaches ``r0`` (and ``c0``) as an ``xdp_frame`` from
        which the receiver builds a fresh skb after its own XDP program -- one frame per
        MTU-sized segment, as from a NIC, instead of veth's GSO super-packets.  Checksum
        offload is off on both ends (a redirected frame carries no partial checksum); GRO
        stays on, so both receive in NAPI mode.  Both variants of a comparison use the same
        wire, so its cost is in both."""
        i = self.index[role]
        client = f"{PREFIX}{os.getpid()}-c-{role}"
        run("ip", "netns", "add", client)
        self.clients.append(client)
        run(
            "ip", "-n", client, "link", "add", "c0", "type", "veth",
            "peer", "name", f"w-{role}", "netns", self.sender,
        )  # fmt: skip
        route = [f"route add {self.vip}/32 dev c0"]
        if neigh_mac:
            route.append(f"neigh replace {self.vip} lladdr {neigh_mac} dev c0 nud permanent")
        ip_batch(client, ["link set lo up", f"addr add 198.18.{i}.1/24 dev c0", "link set c0 up"])
        ip_batch(client, route)
        ns_run(client, "ethtool", "-K", "c0", "gro", "on", "tx", "off")
        ns_run(self.receivers[role], "ethtool", "-K", "r0", "tx", "off")
        ip_batch(self.sender, [f"addr flush dev s-{role}", f"link set w-{role} up"])
        with netns_entered(self.sender):
            w, s = socket.if_nametoindex(f"w-{role}"), socket.if_nametoindex(f"s-{role}")
            for dev, out in ((w, s), (s, w)):
                prog = bpfgen.load_redirect_program(out)
                self.fds.append(prog)
                self.fds.append(bpfgen.xdp_link(prog, dev))
                if dev == w:
                    self.wire_to_node[role] = prog
        return client

    def tcp_route(self, role: str, client: str, neigh_mac: str | None) -> None:
        """Send TCP from ``client`` (added to ``s-<role>``) to the traffic IP via that veth;
        ``neigh_mac``: a permanent neighbour entry (the multicast MAC), else ARP."""
        i = self.index[role]
        cmds = [f"rule add from {client}/32 lookup {100 + i}"]
        if not client.endswith(".1"):
            cmds.append(f"addr add {client}/24 dev s-{role}")
        cmds.append(f"route add {self.vip}/32 dev s-{role} src {client} table {100 + i}")
        if neigh_mac:
            cmds.append(f"neigh replace {self.vip} lladdr {neigh_mac} dev s-{role} nud permanent")
        ip_batch(self.sender, cmds)

    def start(self, ns: str, *args: str, output: bool = True) -> subprocess.Popen[str]:
        """Start ``args`` in ``ns``; ``output``: its stdout is a pipe for the caller to read
        (else discarded: an unread pipe fills and stops a long-running writer)."""
        assert ns.startswith(PREFIX), ns
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *args],
            stdout=subprocess.PIPE if output else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[str]) -> None:
        """Stop a process this lab started (by its PID) and reap it."""
        if proc.poll() is None:
            proc.kill()
        with suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=5)
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)
        for s in self.sinks:
            s.close()
        self.sinks.clear()
        for fd in reversed(self.fds):  # a link's fd closed: detached
            os.close(fd)
        self.fds.clear()
        self.wire_to_node.clear()
        for ns in [*self.clients, *self.receivers.values(), self.sender]:
            if ns:
                run("ip", "netns", "delete", ns, check=False)
        self.receivers.clear()
        self.clients.clear()
        self.sender = ""


def wait_listen(ns: str, port: int, timeout: float = 5.0) -> None:
    """Until a TCP socket listens on ``port`` in ``ns``."""
    want = f":{port:04X} "
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in read_in(ns, "tcp").splitlines()[1:]:
            f = line.split()
            if want in f[1] + " " and f[3] == "0A":
                return
        time.sleep(0.01)
    raise TimeoutError(f"nothing listens on {port} in {ns}")


def settle(read: Callable[[], int], target: int, timeout: float = 2.0) -> int:
    """Poll a counter until it reaches ``target`` or stops changing; its value."""
    last = read()
    if last >= target:
        return last
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = read()
        if now == last:
            return now
        last = now
    return last
