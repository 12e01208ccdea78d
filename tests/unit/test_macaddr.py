from __future__ import annotations

import pytest

from multihost.macaddr import (
    MacError,
    format_mac,
    is_multicast_mac,
    multicast_mac,
    parse_mac,
)


@pytest.mark.parametrize(
    ("group", "mac"),
    [
        ("239.192.0.1", "01:00:5e:40:00:01"),
        ("239.192.1.2", "01:00:5e:40:01:02"),
        ("224.0.0.1", "01:00:5e:00:00:01"),
        ("239.255.255.255", "01:00:5e:7f:ff:ff"),
        ("224.128.0.1", "01:00:5e:00:00:01"),  # the 24th bit is dropped (32:1 overlap)
        ("ff02::1", "33:33:00:00:00:01"),
        ("ff15::1:ff00:1234", "33:33:ff:00:12:34"),
    ],
)
def test_multicast_mac(group: str, mac: str) -> None:
    assert format_mac(multicast_mac(group)) == mac
    assert is_multicast_mac(multicast_mac(group))


@pytest.mark.parametrize("bad", ["198.18.0.1", "2001:db8::1", "not-an-ip"])
def test_not_multicast(bad: str) -> None:
    with pytest.raises(MacError):
        multicast_mac(bad)


def test_parse_format_round_trip() -> None:
    assert parse_mac("01:00:5E:40:00:01") == bytes.fromhex("01005e400001")
    assert format_mac(parse_mac("02:00:00:00:00:0a")) == "02:00:00:00:00:0a"
    assert not is_multicast_mac(parse_mac("02:00:00:00:00:0a"))
    with pytest.raises(MacError):
        parse_mac("01:00:5e")
    with pytest.raises(MacError):
        format_mac(b"\x01")
