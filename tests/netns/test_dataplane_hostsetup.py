"""HostSetup in real namespaces: apply and restore leave the node exactly as it was (root).

Owns: the node's sysctls, traffic IPs on ``lo`` (IPv6 without DAD), the cluster group's
multicast membership, idempotent apply/restore, and refusing a traffic IP that is already on
the cluster interface without changing anything.  Its own two namespaces, no data plane.
"""

from __future__ import annotations

import ipaddress

import pytest

from multihost.dataplane.hostsetup import HostSetup, HostSetupError, multicast_memberships
from multihost.flowhash import IPAddress
from tests.netns import nsutil
from tests.netns.nsutil_dp import GROUP, GROUP_MAC, ip4


def test_hostsetup_apply_restore_round_trip() -> None:
    nsutil.cleanup_stale()
    with nsutil.netns_group("peer", "node") as ns:
        node = ns["node"]
        nsutil.veth(ns["peer"], "p0", node, "n0")
        nsutil.sysctl(node, "net.ipv4.conf.n0.arp_announce", "1")
        nsutil.sysctl(node, "net.ipv6.conf.n0.drop_unicast_in_l2_multicast", "1")
        nsutil.run("ip", "-n", node, "addr", "add", "198.18.1.11/32", "dev", "lo")
        keys = {
            "net.ipv4.conf.n0.arp_ignore": ("0", "1"),
            "net.ipv4.conf.n0.arp_announce": ("1", "2"),
            "net.ipv6.conf.n0.drop_unicast_in_l2_multicast": ("1", "0"),
        }
        addrs_before = nsutil.addresses(node, "lo")
        mcast_before = multicast_memberships("n0", netns=node)
        assert GROUP_MAC not in mcast_before
        vips: list[IPAddress] = [
            ip4("198.18.1.10"),
            ip4("198.18.1.11"),
            ipaddress.IPv6Address("fe80::c612:10a"),
        ]
        host = HostSetup("n0", vips, GROUP, netns=node)
        host.apply()
        host.apply()  # idempotent
        try:
            assert {k: nsutil.sysctl_get(node, k) for k in keys} == {
                k: v[1] for k, v in keys.items()
            }
            lo = nsutil.addresses(node, "lo")
            assert {"198.18.1.10/32", "198.18.1.11/32", "fe80::c612:10a/128"} <= lo
            assert host.added_addresses == (vips[0], vips[2])
            nodad = nsutil.ns_run(node, "ip", "-6", "addr", "show", "dev", "lo").stdout
            assert "fe80::c612:10a/128 scope link nodad" in nodad
            assert GROUP_MAC in multicast_memberships("n0", netns=node) - mcast_before
            maddr = nsutil.ns_run(node, "ip", "maddr", "show", "dev", "n0").stdout
            assert str(GROUP) in maddr
        finally:
            host.restore()
        host.restore()  # idempotent
        assert {k: nsutil.sysctl_get(node, k) for k in keys} == {k: v[0] for k, v in keys.items()}
        assert nsutil.addresses(node, "lo") == addrs_before
        assert GROUP_MAC not in multicast_memberships("n0", netns=node)
        assert str(GROUP) not in nsutil.ns_run(node, "ip", "maddr", "show", "dev", "n0").stdout

        # a traffic IP on the cluster interface is refused, and nothing is left changed
        nsutil.run("ip", "-n", node, "addr", "add", "198.18.1.12/32", "dev", "n0")
        bad = HostSetup("n0", [ip4("198.18.1.13"), ip4("198.18.1.12")], GROUP, netns=node)
        with pytest.raises(HostSetupError, match=r"198\.18\.1\.12"):
            bad.apply()
        assert {k: nsutil.sysctl_get(node, k) for k in keys} == {k: v[0] for k, v in keys.items()}
        assert nsutil.addresses(node, "lo") == addrs_before
