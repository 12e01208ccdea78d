"""The lab's network: namespaces, the switch bridge, one veth pair per host, addresses.

Owns: creating the lab's namespaces (each recorded in the :class:`LabState` before it is
made), the switch bridge (IGMP snooping per :class:`~multihost.lab.switch.SwitchMode`), one
veth pair per host (created inside the switch namespace with its peer placed directly into
the host's namespace, so nothing ever appears in the root namespace), addresses and links,
all through pyroute2 netlink; a namespace's sysctls and nft scripts; and waiting for IPv6
duplicate address detection.  The netlink helpers (:func:`iproute`, :func:`ifindex`,
:func:`add_veth`) serve :mod:`multihost.lab.backbuild` too.

Must not: touch the root namespace's links, routes or firewall, start processes, or decide
the order of the steps (:func:`multihost.lab.build.build` runs them, all or nothing).
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

from multihost.dataplane.nft import netns_entered
from multihost.lab.addressing import SUBNET6
from multihost.lab.hosts import Host
from multihost.lab.naming import NETNS_DIR
from multihost.lab.state import LabError, LabState
from multihost.lab.topology import PROBE_PORTS
from multihost.linkwatch import IF_INET6, dad_pending

#: The bridge querier's query response interval, in centiseconds (USER_HZ).
QUERY_RESPONSE_CS = 100
#: IFA_F_NODAD (<linux/if_addr.h>): the address skips duplicate address detection.
NODAD = 0x02


def iproute(netns: str) -> Any:
    from pyroute2 import IPRoute

    # flags=0: never create a namespace implicitly (IPRoute's default is O_CREAT).
    return IPRoute(netns=netns, flags=0)


def ifindex(ipr: Any, ifname: str) -> int:
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
    return ifindex(ipr, port)


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
    with iproute(sw.netns) as ipr:
        ipr.link("set", index=ifindex(ipr, "lo"), state="up")
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
        bridge = ifindex(ipr, sw.bridge)
        if sw.mcast_querier:
            ipr.link("set", index=bridge, kind="bridge", br_mcast_querier=1)
        ipr.link("set", index=bridge, state="up")


def wire_hosts(state: LabState) -> None:
    topo = state.topology
    sw = topo.switch
    # A routed lab's clients hang off the router (backbuild.wire_router), not the switch.
    hosts = topo.hosts if topo.router is None else topo.nodes
    with iproute(sw.netns) as ipr:
        bridge = ifindex(ipr, sw.bridge)
        for h in hosts:
            port = add_veth(ipr, h.switch_port, h.interface, h.netns, h.mac)
            ipr.link("set", index=port, master=bridge)
            if h.role == "node" and sw.node_ports_mrouter:
                ipr.brport("set", index=port, multicast_router=2)
            ipr.link("set", index=port, state="up")
    for h in hosts:
        configure_host(h)


def configure_host(h: Host) -> None:
    with iproute(h.netns) as ipr:
        ipr.link("set", index=ifindex(ipr, "lo"), state="up")
        dev = ifindex(ipr, h.interface)
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
