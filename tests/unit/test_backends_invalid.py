"""[[backend]] tables refused: every validation error (file, key, value), of the first and
of a second back end, and preflight and ``check-config``/``backend-routes`` refusing the
same configuration.  The configurations are in backend_configs.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from multihost import preflight
from multihost.cli import main
from multihost.config import ConfigError, parse_config
from tests.unit.backend_configs import V6_CFG, cfg_text

BAD: list[tuple[str, str, str, str, str]] = [
    # (what, old, new, key, reason)
    (
        "missing node",
        ', C = "198.19.0.103/24" }',
        " }",
        "backend[0].addresses",
        "no address for node 'C'",
    ),
    (
        "unknown node",
        'C = "198.19.0.103/24" }',
        'C = "198.19.0.103/24", E = "198.19.0.104/24" }',
        "backend[0].addresses.E",
        "unknown node 'E' (nodes: 'A', 'B', 'C')",
    ),
    (
        "duplicate address",
        'B = "198.19.0.102/24"',
        'B = "198.19.0.101/24"',
        "backend[0].addresses.B",
        "198.19.0.101 is already node 'A''s address",
    ),
    (
        "other subnet",
        'A = "198.19.0.101/24"',
        'A = "198.19.1.101/24"',
        "backend[0].addresses.A",
        "198.19.1.101/24 is not in the same subnet as any backend_gateway of node 'A' "
        "(node[0].backend_gateway: 198.19.0.1)",
    ),
    (
        "no gateway at all",
        'backend_gateway = "198.19.0.1"\n',
        "",
        "backend[0].addresses.A",
        "(node[0].backend_gateway: none)",
    ),
    (
        "two gateways in the subnet",
        'B = "198.19.0.102/24"',
        'B = "198.19.0.102/16"',
        "backend[0].addresses.B",
        "198.19.0.0/16 holds several gateways of node 'B': 198.19.0.2, 198.19.64.2",
    ),
    (
        "mixed families",
        'B = "198.19.0.102/24"',
        'B = "2001:db8:19::102/64"',
        "backend[0].addresses.B",
        "2001:db8:19::102/64 is IPv6 but backend[0].addresses.A (198.19.0.101/24) is IPv4",
    ),
    (
        "no prefix length",
        'A = "198.19.0.101/24"',
        'A = "198.19.0.101"',
        "backend[0].addresses.A",
        "'198.19.0.101' needs a prefix length (e.g. 198.19.0.101/24)",
    ),
    (
        "not an address",
        'A = "198.19.0.101/24"',
        'A = "db-a/24"',
        "backend[0].addresses.A",
        "'db-a/24' is not ADDRESS/PREFIXLEN",
    ),
    (
        "not a string",
        'A = "198.19.0.101/24"',
        "A = 5",
        "backend[0].addresses.A",
        "expected ADDRESS/PREFIXLEN, got 5",
    ),
    (
        "broadcast address",
        'A = "198.19.0.101/24"',
        'A = "198.19.0.255/24"',
        "backend[0].addresses.A",
        "198.19.0.255/24 is the broadcast address of 198.19.0.0/24",
    ),
    (
        "the gateway itself",
        'A = "198.19.0.101/24"',
        'A = "198.19.0.1/24"',
        "backend[0].addresses.A",
        "198.19.0.1 is node 'A''s own gateway (node[0].backend_gateway)",
    ),
    (
        "another node's gateway",
        'A = "198.19.0.101/24"',
        'A = "198.19.0.2/24"',
        "backend[0].addresses.A",
        "198.19.0.2 is already node 'B''s gateway (node[1].backend_gateway[0])",
    ),
    (
        "gateway in another subnet",
        'backend_gateway = "198.19.0.1"',
        'backend_gateway = "198.18.0.1"',
        "backend[0].addresses.A",
        "(node[0].backend_gateway: 198.18.0.1)",
    ),
    (
        "a traffic IP as gateway",
        'backend_gateway = "198.19.0.1"',
        'backend_gateway = "198.18.0.100"',
        "node[0].backend_gateway",
        "198.18.0.100 is a traffic IP of group 'web'",
    ),
    (
        "another node's address as gateway",
        'backend_gateway = "198.19.0.1"',
        'backend_gateway = "198.18.0.12"',
        "node[0].backend_gateway",
        "198.18.0.12 is node 'B''s address",
    ),
    (
        "shared gateway",
        'backend_gateway = ["198.19.0.3", "2001:db8:19::3"]',
        'backend_gateway = ["198.19.0.1"]',
        "node[2].backend_gateway[0]",
        "198.19.0.1 is already node 'A''s gateway",
    ),
    (
        "bad gateway",
        'backend_gateway = "198.19.0.1"',
        'backend_gateway = "gw-a"',
        "node[0].backend_gateway",
        "'gw-a' is not an IP address",
    ),
    (
        "multicast gateway",
        'backend_gateway = "198.19.0.1"',
        'backend_gateway = "239.192.0.9"',
        "node[0].backend_gateway",
        "239.192.0.9 cannot be a gateway",
    ),
    (
        "empty gateway list",
        'backend_gateway = "198.19.0.1"',
        "backend_gateway = []",
        "node[0].backend_gateway",
        "expected an IP address or an array of them, got []",
    ),
    (
        "reserved table",
        'interface = "eth1"',
        'interface = "eth1"\ntable_base = 250',
        "backend[0].table_base",
        "250 puts node 'B' (slot 5) in table 255 (the kernel's 'local' table)",
    ),
    (
        "table main",
        'interface = "eth1"',
        'interface = "eth1"\ntable_base = 252',
        "backend[0].table_base",
        "252 puts node 'C' (slot 2) in table 254 (the kernel's 'main' table)",
    ),
    (
        "table zero",
        'interface = "eth1"',
        'interface = "eth1"\ntable_base = 0',
        "backend[0].table_base",
        "0 is outside 1..4294967295",
    ),
    (
        "table too big",
        'interface = "eth1"',
        'interface = "eth1"\ntable_base = 4294967293',
        "backend[0].table_base",
        "4294967293 puts node 'B' (slot 5) in table 4294967298 (above 4294967295)",
    ),
    (
        "table not an integer",
        'interface = "eth1"',
        'interface = "eth1"\ntable_base = "100"',
        "backend[0].table_base",
        "expected an integer, got str",
    ),
    (
        "priority too big",
        'interface = "eth1"',
        'interface = "eth1"\nrule_priority_base = 32763',
        "backend[0].rule_priority_base",
        "32763 gives node 'B' (slot 5) rule priority 32768, above 32765",
    ),
    (
        "priority zero",
        'interface = "eth1"',
        'interface = "eth1"\nrule_priority_base = 0',
        "backend[0].rule_priority_base",
        "0 is outside 1..32765",
    ),
    (
        "unknown key",
        'interface = "eth1"',
        'interface = "eth1"\ntable = 5',
        "backend[0].table",
        "unknown key",
    ),
    (
        "bad name",
        'name = "db1"',
        'name = "db 1"',
        "backend[0].name",
        "'db 1' must be 1-32 of",
    ),
    (
        "no name",
        'name = "db1"\n',
        "",
        "backend[0].name",
        "is required",
    ),
    (
        "bad interface",
        'interface = "eth1"',
        'interface = "a/b"',
        "backend[0].interface",
        "'a/b' is not a valid interface name",
    ),
    (
        "addresses not a table",
        'addresses = { A = "198.19.0.101/24", B = "198.19.0.102/24", C = "198.19.0.103/24" }',
        'addresses = ["198.19.0.101/24"]',
        "backend[0].addresses",
        "expected a table, got list",
    ),
    (
        "backend not an array",
        "[[backend]]",
        "[backend]",
        "backend",
        "expected an array, got dict",
    ),
]


@pytest.mark.parametrize(
    ("old", "new", "key", "reason"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_backend_config(old: str, new: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(cfg_text(old, new), "b.toml")
    assert e.value.key == key
    assert reason in e.value.reason
    assert str(e.value).startswith(f"b.toml: {key}: ")


BAD_SECOND = [
    ("duplicate name", 'name = "db6"', 'name = "db1"', "backend[1].name", "'db1' is defined twice"),
    (
        "address of another back end",
        'A = "2001:db8:19::101/64", B = "2001:db8:19::102/64", C = "2001:db8:19::103/64"',
        'A = "198.19.0.101/24", B = "198.19.0.112/24", C = "198.19.0.113/24"',
        "backend[1].addresses.A",
        "198.19.0.101 is already back end 'db1''s address for node 'A'",
    ),
    (
        "IPv6 network address",
        'A = "2001:db8:19::101/64"',
        'A = "2001:db8:19::/64"',
        "backend[1].addresses.A",
        "is the network address of 2001:db8:19::/64",
    ),
]


@pytest.mark.parametrize(
    ("old", "new", "key", "reason"), [b[1:] for b in BAD_SECOND], ids=[b[0] for b in BAD_SECOND]
)
def test_bad_second_backend(old: str, new: str, key: str, reason: str) -> None:
    assert old in V6_CFG
    with pytest.raises(ConfigError) as e:
        parse_config(V6_CFG.replace(old, new), "b.toml")
    assert (e.value.key, reason in e.value.reason) == (key, True), str(e.value)


def test_preflight_and_check_config_refuse_the_same(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg_text('A = "198.19.0.101/24"', 'A = "198.19.1.101/24"'))
    with pytest.raises(ConfigError, match="not in the same subnet"):
        preflight.load(bad, with_key=False)
    assert main(["check-config", str(bad), "--no-key", "--json"]) == 2
    got = json.loads(capsys.readouterr().out)
    assert got["error"]["key"] == "backend[0].addresses.A"
    assert main(["backend-routes", "--config", str(bad), "--backend", "db1", "--json"]) == 2
    cap = capsys.readouterr()
    got = json.loads(cap.out)
    assert got == {"ok": False, "error": got["error"], "code": 2}
    assert "backend[0].addresses.A: 198.19.1.101/24 is not in the same subnet" in got["error"]
    assert cap.err == f"multihost: error: {got['error']}\n"
