"""When the cluster link can carry this node's replies (multihost.linkwatch): up, and for
IPv6 not while duplicate address detection holds every link-local address of the
interface (the kernel then sends no Neighbor Solicitation for a reply from a traffic IP)."""

from __future__ import annotations

from pathlib import Path

import pytest

from multihost import linkwatch
from multihost.config import parse_config
from multihost.linkwatch import dad_pending, not_ready

LL = "fe80000000000000b0abdefffeac5e02"
LL2 = "fe800000000000000000000000000001"
GLOBAL = "20010db8000000000000000000000011"


def row(addr: str, scope: int, flags: int, dev: str = "eth0") -> str:
    return f"{addr} 06 40 {scope:02x} {flags:02x} {dev:>8}"


@pytest.mark.parametrize(
    ("rows", "pending"),
    [
        ([row(LL, 0x20, 0x80)], False),  # permanent link-local: ready
        ([row(LL, 0x20, 0xC0)], True),  # tentative (after link up): DAD runs
        ([row(LL, 0x20, 0x84)], True),  # optimistic: not usable for NS either
        ([row(LL, 0x20, 0xC8)], False),  # DAD failed: never usable, nothing to wait for
        ([row(LL, 0x20, 0xC0), row(LL2, 0x20, 0x80)], False),  # another one is usable
        ([row(GLOBAL, 0x00, 0x82), row(LL, 0x20, 0xC0)], True),  # a nodad global does not help
        ([row(GLOBAL, 0x00, 0x82)], False),  # no link-local at all (addr_gen_mode none)
        ([row(LL, 0x20, 0xC0, "eth1")], False),  # another interface's DAD
        ([row(LL, 0x20, 0xC0, "eth00")], False),  # a name that only starts the same
        ([], False),
        (["garbage", row(LL, 0x20, 0xC0)], True),
    ],
)
def test_dad_pending(rows: list[str], pending: bool) -> None:
    assert dad_pending("\n".join(rows) + "\n", "eth0") is pending


def test_not_ready_reads_operstate_and_if_inet6(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inet6 = tmp_path / "if_inet6"
    monkeypatch.setattr(linkwatch, "IF_INET6", str(inet6))
    up = [True]
    monkeypatch.setattr(linkwatch, "link_up", lambda _i: up[0])
    inet6.write_text(row(LL, 0x20, 0xC0) + "\n")
    assert not_ready("eth0", ipv6=True) == "IPv6 duplicate address detection running on eth0"
    assert not_ready("eth0", ipv6=False) is None  # an IPv4-only node does not wait for DAD
    inet6.write_text(row(LL, 0x20, 0x80) + "\n")
    assert not_ready("eth0", ipv6=True) is None
    inet6.unlink()  # no IPv6 in the namespace
    assert not_ready("eth0", ipv6=True) is None
    up[0] = False
    assert not_ready("eth0", ipv6=True) == "cluster link down"


BASE = """
[cluster]
name = "c"
interface = "eth0"
key_file = "/nonexistent"
multicast_group = "{group}"
{extra}
[[node]]
name = "A"
address = "{a}"
slot = 0
[[traffic_ip_group]]
name = "web"
addresses = [{addrs}]
members = ["A"]
"""


@pytest.mark.parametrize(
    ("group", "extra", "a", "addrs", "uses"),
    [
        ("239.192.0.1", "", "198.18.0.11", '"198.18.0.100"', False),
        ("239.192.0.1", 'multicast_group6 = "ff15::1"', "198.18.0.11", '"2001:db8::100"', True),
        ("ff15::1", 'multicast_group4 = "239.192.0.1"', "2001:db8::11", '"198.18.0.100"', True),
    ],
)
def test_a_config_uses_ipv6_with_ipv6_heartbeats_or_traffic_ips(
    group: str, extra: str, a: str, addrs: str, uses: bool
) -> None:
    cfg = parse_config(BASE.format(group=group, extra=extra, a=a, addrs=addrs))
    assert cfg.uses_ipv6 is uses
