"""Configuration parsing: defaults, every validation error names file, key and reason."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multihost.config import ConfigError, load_config, parse_config, read_key, timing_warnings
from multihost.flowhash import HashMode
from multihost.membership.config import MembershipConfig, MembershipConfigError

EXAMPLE = Path(__file__).parents[2] / "contrib" / "multihost.example.toml"

MINIMAL = """
[cluster]
name = "c1"
interface = "eth0"
multicast_group = "239.192.0.1"
key_file = "key"

[[node]]
name = "A"
address = "198.18.0.11"
slot = 0

[[node]]
name = "B"
address = "198.18.0.12"
slot = 3

[[traffic_ip_group]]
name = "web"
addresses = ["198.18.0.100"]
members = ["A", "B"]
"""


def test_example_file_is_valid() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.cluster.hash_seed == 0x5EED1234
    assert [n.name for n in cfg.nodes] == ["A", "B", "C"]
    assert cfg.groups[0].hash is HashMode.FOUR_TUPLE


def test_defaults() -> None:
    cfg = parse_config(MINIMAL, "m.toml")
    assert cfg.cluster.heartbeat_interval_ms == 100
    assert cfg.cluster.dead_after_ms == 230  # one lost heartbeat plus 30 ms
    assert cfg.cluster.lease_margin_ms == 10  # follows the interval
    assert cfg.cluster.heartbeat_jitter_ms == 5
    assert cfg.cluster.port == 7946
    assert cfg.cluster.metrics_address is None
    assert not cfg.cluster.quorum
    assert cfg.slots == {"A": 0, "B": 3}
    assert cfg.buckets == 40320
    assert 0 <= cfg.cluster.hash_seed < 2**32


def test_digest_tracks_ownership_only() -> None:
    a = parse_config(MINIMAL)
    b = parse_config(MINIMAL.replace('interface = "eth0"', 'interface = "eth1"'))
    c = parse_config(MINIMAL.replace("slot = 3", "slot = 4"))
    assert a.digest() == b.digest()
    assert a.digest() != c.digest()
    assert len(a.digest()) == 16


def test_find_local_node() -> None:
    cfg = parse_config(MINIMAL)
    assert cfg.find_local_node([ipaddress.ip_address("198.18.0.12")]).name == "B"
    with pytest.raises(ConfigError, match="pass --node"):
        cfg.find_local_node([ipaddress.ip_address("198.18.0.99")])


@pytest.mark.parametrize(
    ("old", "new", "key", "reason"),
    [
        (
            'multicast_group = "239.192.0.1"',
            'multicast_group = "198.18.0.1"',
            "cluster.multicast_group",
            "not a multicast address",
        ),
        ('name = "c1"', 'name = "c 1"', "cluster.name", "must be"),
        ('interface = "eth0"', "interface = 5", "cluster.interface", "expected a string"),
        (
            'key_file = "key"',
            'key_file = "key"\nheartbeat_interval_ms = 100\ndead_after_ms = 150',
            "cluster.dead_after_ms",
            "at least 2 x",
        ),
        ('key_file = "key"', 'key_file = "key"\nport = 70000', "cluster.port", "outside 1..65535"),
        (
            'key_file = "key"',
            'key_file = "key"\nhash_seed = "zz"',
            "cluster.hash_seed",
            "not an integer",
        ),
        ('key_file = "key"', 'key_file = "key"\nheartbeat = 1', "cluster.heartbeat", "unknown key"),
        ("slot = 3", "slot = 0", "node[1].slot", "already node 'A'"),
        ("slot = 3", "slot = 16", "node[1].slot", "outside 0..15"),
        ('address = "198.18.0.12"', 'address = "198.18.0.11"', "node[1].address", "already"),
        ('address = "198.18.0.12"', 'address = "nope"', "node[1].address", "not an IP address"),
        (
            'members = ["A", "B"]',
            'members = ["A", "E"]',
            "traffic_ip_group[0].members[1]",
            "unknown node 'E'",
        ),
        (
            'members = ["A", "B"]',
            'members = ["A", "A"]',
            "traffic_ip_group[0].members[1]",
            "listed twice",
        ),
        (
            'members = ["A", "B"]',
            'members = ["A"]\nhash = "5-tuple"',
            "traffic_ip_group[0].hash",
            "not one of",
        ),
        (
            'addresses = ["198.18.0.100"]',
            'addresses = ["198.18.0.11"]',
            "traffic_ip_group[0].addresses[0]",
            "node 'A'",
        ),
        (
            'addresses = ["198.18.0.100"]',
            "addresses = []",
            "traffic_ip_group[0].addresses",
            "at least one",
        ),
        ("slot = 0", 'slot = 0\nextra = "x"', "node[0].extra", "unknown key"),
        ("slot = 0", "slot = true", "node[0].slot", "got a boolean"),
    ],
)
def test_errors_name_file_key_reason(old: str, new: str, key: str, reason: str) -> None:
    text = MINIMAL.replace(old, new, 1)
    assert text != MINIMAL
    with pytest.raises(ConfigError) as info:
        parse_config(text, "/etc/mh.toml")
    assert info.value.key == key
    assert reason in info.value.reason
    assert str(info.value).startswith(f"/etc/mh.toml: {key}: ")


def test_toml_syntax_error() -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config("[cluster", "x.toml")


def test_missing_sections() -> None:
    with pytest.raises(ConfigError, match="cluster"):
        parse_config("", "x.toml")
    many = MINIMAL.replace('members = ["A", "B"]', "members = [" + ",".join(['"A"'] * 17) + "]")
    with pytest.raises(ConfigError, match="at most 16"):
        parse_config(many)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_key_file_checks(tmp_path: Path) -> None:
    cfg_path = tmp_path / "mh.toml"
    cfg_path.write_text(MINIMAL)
    cfg = load_config(cfg_path)
    key = tmp_path / "key"
    with pytest.raises(ConfigError, match=r"cluster\.key_file"):
        read_key(cfg)
    key.write_bytes(b"0123456789abcdef0123\n")
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError, match="accessible by others"):
        read_key(cfg)
    os.chmod(key, 0o600)
    assert read_key(cfg) == b"0123456789abcdef0123"
    key.write_bytes(b"short")
    with pytest.raises(ConfigError, match="at least 16"):
        read_key(cfg)


def _timing(**keys: int) -> str:
    extra = "".join(f"\n{k} = {v}" for k, v in keys.items())
    return MINIMAL.replace('key_file = "key"', 'key_file = "key"' + extra)


@pytest.mark.parametrize(
    ("interval", "dead_after", "margin"),
    [(100, 230, 10), (20, 70, 5), (10, 50, 5), (5, 40, 5), (1000, 2250, 50)],
)
def test_lease_margin_and_dead_after_follow_the_interval(
    interval: int, dead_after: int, margin: int
) -> None:
    c = parse_config(_timing(heartbeat_interval_ms=interval)).cluster
    assert (c.dead_after_ms, c.lease_margin_ms) == (dead_after, margin)
    assert timing_warnings("m.toml", c) == []  # the defaults hold at every interval


@pytest.mark.parametrize(
    ("keys", "reason"),
    [
        ({"lease_margin_ms": 30}, "cannot hold"),  # 230 - 200 = 30: no lease left
        ({"dead_after_ms": 200}, "cannot hold"),  # exactly 2 intervals, no hold
        ({"lease_margin_ms": 0}, "outside 1..60000"),
        ({"heartbeat_jitter_ms": 100}, "outside 0..99"),
    ],
)
def test_timing_that_cannot_hold_is_an_error_naming_the_key(
    keys: dict[str, int], reason: str
) -> None:
    with pytest.raises(ConfigError, match=reason) as exc:
        parse_config(_timing(**keys))
    assert exc.value.key == "cluster." + (
        "lease_margin_ms" if "dead_after_ms" in keys else next(iter(keys))
    )


@pytest.mark.parametrize(
    ("keys", "reason"),
    [
        ({"dead_after_ms": 220}, "pauses the survivors' new flows"),  # 210 <= 215
        ({"heartbeat_jitter_ms": 9}, "pauses the survivors' new flows"),  # 220 <= 227
        ({"dead_after_ms": 210, "takeover_hold_ms": 50}, "false failover"),
        ({"heartbeat_interval_ms": 20, "dead_after_ms": 50}, "false failover"),
    ],
)
def test_dead_after_too_close_to_the_interval_is_a_warning_naming_the_key(
    keys: dict[str, int], reason: str
) -> None:
    cfg = parse_config(_timing(**keys), "m.toml")
    warnings = timing_warnings(cfg.source, cfg.cluster)
    assert any(w.key == "cluster.dead_after_ms" and reason in w.reason for w in warnings)
    assert all(str(w).startswith("m.toml: cluster.dead_after_ms: ") for w in warnings)


@settings(max_examples=300, deadline=None)
@given(
    interval=st.integers(5, 2000),
    dead_after=st.integers(1, 5000),
    hold=st.integers(0, 500),
    margin=st.integers(0, 300),
    jitter=st.integers(0, 300),
)
def test_the_core_accepts_exactly_what_the_configuration_accepts(
    interval: int, dead_after: int, hold: int, margin: int, jitter: int
) -> None:
    """The agent builds the core's configuration from the parsed file: the core must not
    refuse anything check-config accepted, nor accept timing check-config refuses."""
    text = _timing(
        heartbeat_interval_ms=interval,
        dead_after_ms=dead_after,
        takeover_hold_ms=hold,
        lease_margin_ms=margin,
        heartbeat_jitter_ms=jitter,
    )
    try:
        c = parse_config(text).cluster
        parsed = True
    except ConfigError:
        parsed = False
    try:
        MembershipConfig(
            cluster="c1",
            node="A",
            members={"A": 0, "B": 3},
            groups={"web": frozenset({"A", "B"})},
            key=b"k" * 16,
            interval=interval / 1000,
            dead_after=dead_after / 1000,
            takeover_hold=hold / 1000,
            lease_margin=margin / 1000,
            jitter=jitter / 1000,
        )
        core = True
    except MembershipConfigError:
        core = False
    assert parsed == core
    if parsed:
        assert c.dead_after_ms == dead_after


@pytest.mark.parametrize(
    ("line", "key", "reason"),
    [
        ('dataplane = "ebpf"', "cluster.dataplane", "not one of 'auto', 'xdp', 'nft'"),
        ('xdp_mode = "offload"', "cluster.xdp_mode", "not one of 'auto', 'native', 'generic'"),
        ('bpf_pin_root = "bpf"', "cluster.bpf_pin_root", "must be an absolute path"),
    ],
)
def test_dataplane_keys(line: str, key: str, reason: str) -> None:
    assert parse_config(MINIMAL).cluster.dataplane == "auto"
    ok = parse_config(MINIMAL.replace('key_file = "key"', 'key_file = "key"\ndataplane = "nft"'))
    assert ok.cluster.dataplane == "nft"
    with pytest.raises(ConfigError) as info:
        parse_config(MINIMAL.replace('key_file = "key"', f'key_file = "key"\n{line}'), "m.toml")
    assert info.value.key == key and reason in info.value.reason
