"""The lab's addressing plan, and the nodes and clients laid out on it.

Owns: the ranges and defaults of the front network (inside 198.18.0.0/15, the group inside
239.192.0.0/14, and the IPv6 plan of a dual-stack lab), the lab's MACs, laying out the
nodes' and clients' :class:`~multihost.lab.hosts.Host` records (names, namespaces, ports,
MACs, addresses; a routed lab's clients on their links to the router, whose plan is
:mod:`multihost.lab.backnet`'s), and checking one host's addresses against the plan.

Must not: create, read or delete anything (no sockets, files, processes or netlink), or
check more than one host against the plan (:func:`multihost.lab.topology.check` checks a
whole lab).

Addressing plan (one /16 broadcast domain, every host on-link)::

    198.18.0.100         the traffic IP (VIP), port 80 (nginx) and 7 (UDP echo)
    198.18.0.11 ...      nodes A, B, ... (A = .11)
    198.18.0.201 ...     clients c1, c2, ... (primary address)
    198.18.K.1 ...       client cK's extra source addresses (ICMP hashes on addresses only)

With ``ipv6`` (``lab up --ipv6``) the lab is dual stack and its heartbeats go over IPv6: every
host also gets an address in one on-link /64 of the documentation range, the traffic IP group
gets an IPv6 traffic IP, and the cluster group is ``ff15::1`` (site-local, transient; MAC
``33:33:00:00:00:01``), with 239.192.0.1 kept for the IPv4 traffic IP's ARP MAC::

    2001:db8::100        the IPv6 traffic IP (VIP6)
    2001:db8::11 ...     nodes A, B, ... (node addresses: heartbeats are IPv6)
    2001:db8::201 ...    clients c1, c2, ...
    2001:db8::K:1 ...    client cK's extra IPv6 source addresses
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from multihost.lab.backnet import client_addresses, client_link
from multihost.lab.hosts import Host
from multihost.lab.naming import TopologyError
from multihost.macaddr import format_mac

#: Benchmarking range (RFC 2544): the only addresses a lab host ever gets.
LAB_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
#: Organisation-local scope (RFC 2365): the only groups a lab uses.
GROUP_RANGE = ipaddress.IPv4Network("239.192.0.0/14")
SUBNET = ipaddress.IPv4Network("198.18.0.0/16")
DEFAULT_VIP = "198.18.0.100"
DEFAULT_GROUP = "239.192.0.1"
#: Documentation range (RFC 3849) and transient site-local groups: the lab's IPv6 plan.
LAB_RANGE6 = ipaddress.IPv6Network("2001:db8::/32")
GROUP_RANGE6 = ipaddress.IPv6Network("ff15::/16")
SUBNET6 = ipaddress.IPv6Network("2001:db8::/64")
DEFAULT_VIP6 = "2001:db8::100"
DEFAULT_GROUP6 = "ff15::1"
#: Extra source addresses per client, so ICMP probes (address-only hash) spread over nodes.
EXTRA_SOURCES = 16


def lab_mac(role: int, index: int) -> str:
    # Locally administered unicast (02:...), "mh" (6d:68), role byte, index.
    return format_mac(bytes((0x02, 0x6D, 0x68, role, 0x00, index)))


def node_hosts(prefix: str, names: str, *, ipv6: bool) -> tuple[Host, ...]:
    """Nodes ``names`` (A, B, ...) in slot order: A = .11 (and ``2001:db8::11``)."""
    net = SUBNET
    return tuple(
        Host(
            name=name,
            role="node",
            netns=f"{prefix}{name}",
            interface="eth0",
            switch_port=f"p-{name}",
            mac=lab_mac(0x0A, i + 1),
            address=str(net.network_address + 11 + i),
            prefixlen=net.prefixlen,
            addresses6=(str(SUBNET6.network_address + 0x11 + i),) if ipv6 else (),
        )
        for i, name in enumerate(names)
    )


def client_hosts(prefix: str, clients: int, *, ipv6: bool, routed: bool) -> tuple[Host, ...]:
    """Clients c1 ... c``clients``, each with :data:`EXTRA_SOURCES` extra source addresses;
    ``routed``: each on a link of its own to the router (interface ck there)."""
    net = SUBNET
    client_hosts = tuple(
        Host(
            name=f"c{k}",
            role="client",
            netns=f"{prefix}c{k}",
            interface="eth0",
            switch_port=f"p-c{k}",
            mac=lab_mac(0x0C, k),
            address=str(net.network_address + 200 + k),
            prefixlen=net.prefixlen,
            extra_addresses=tuple(
                str(net.network_address + 256 * k + j) for j in range(1, EXTRA_SOURCES + 1)
            ),
            addresses6=(
                (
                    str(SUBNET6.network_address + 0x200 + k),
                    *(
                        str(SUBNET6.network_address + (k << 16) + j)
                        for j in range(1, EXTRA_SOURCES + 1)
                    ),
                )
                if ipv6
                else ()
            ),
        )
        for k in range(1, clients + 1)
    )
    if routed:  # each client on a /24 link of its own to the router (interface ck there)
        client_hosts = tuple(
            replace(
                c,
                switch_port=c.name,
                address=client_addresses(k, EXTRA_SOURCES)[0],
                extra_addresses=client_addresses(k, EXTRA_SOURCES)[1],
                prefixlen=client_link(k).prefixlen,
            )
            for k, c in enumerate(client_hosts, 1)
        )
    return client_hosts


def check_host(
    h: Host, net: ipaddress.IPv4Network, *, ipv6: bool, seen: set[str], macs: set[str]
) -> None:
    """Raise :class:`TopologyError` unless ``h``'s IPv4 addresses are in ``net``, its IPv6
    ones (exactly in a dual-stack lab, ``ipv6``) in :data:`SUBNET6`, and none of them (not in
    ``seen``) nor its MAC (not in ``macs``) is used twice; adds them to ``seen``/``macs``."""
    for a in h.addresses:
        if ipaddress.IPv4Address(a) not in net:
            raise TopologyError(f"{h.name}: address {a} is outside {net}")
        if a in seen:
            raise TopologyError(f"{h.name}: address {a} is used twice")
        seen.add(a)
    for a in h.addresses6:
        if ipaddress.IPv6Address(a) not in SUBNET6 or not SUBNET6.subnet_of(LAB_RANGE6):
            raise TopologyError(f"{h.name}: address {a} is outside {SUBNET6}")
        if a in seen:
            raise TopologyError(f"{h.name}: address {a} is used twice")
        seen.add(a)
    if bool(h.addresses6) != ipv6:
        raise TopologyError(f"{h.name}: IPv6 addresses exactly in a dual-stack lab")
    if h.mac in macs:
        raise TopologyError(f"{h.name}: MAC {h.mac} is used twice")
    macs.add(h.mac)
