"""[[backend]] tables: parsing, every validation error (file, key, value), the rendered plan
(golden text and JSON), and the ``backend-routes`` / ``check-config`` commands without root.

Regenerate the golden files after an intended change with
``MULTIHOST_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_backends.py`` and review the diff.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

import pytest

from multihost import preflight
from multihost.backendplan import AddressStep, RouteStep, RuleStep, plan, render_json, render_text
from multihost.backends import find_backend
from multihost.cli import main
from multihost.config import ConfigError, load_config, parse_config

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
UPDATE = os.environ.get("MULTIHOST_UPDATE_GOLDEN") == "1"
EXAMPLE = Path(__file__).parents[2] / "contrib" / "multihost.example.toml"

# Slots 0, 5, 2 (not in file order): tables and priorities follow the slot.
BASE = """
[cluster]
name = "c1"
interface = "eth0"
multicast_group = "239.192.0.1"
key_file = "key"

[[node]]
name = "A"
address = "198.18.0.11"
slot = 0
backend_gateway = "198.19.0.1"

[[node]]
name = "B"
address = "198.18.0.12"
slot = 5
backend_gateway = ["198.19.0.2", "198.19.64.2", "2001:db8:19::2"]

[[node]]
name = "C"
address = "198.18.0.13"
slot = 2
backend_gateway = ["198.19.0.3", "2001:db8:19::3"]

[[traffic_ip_group]]
name = "web"
addresses = ["198.18.0.100"]
members = ["A", "B", "C"]

[[backend]]
name = "db1"
interface = "eth1"
addresses = { A = "198.19.0.101/24", B = "198.19.0.102/24", C = "198.19.0.103/24" }
"""

SECOND = """
[[backend]]
name = "db6"
interface = "ens5"
addresses = { A = "2001:db8:19::101/64", B = "2001:db8:19::102/64", C = "2001:db8:19::103/64" }
table_base = 7600
rule_priority_base = 20000
"""


def cfg_text(old: str = "", new: str = "", extra: str = "") -> str:
    text = BASE + extra
    if old:
        assert old in text, old
        text = text.replace(old, new, 1)
    return text


V6_CFG = cfg_text(extra=SECOND).replace(
    'backend_gateway = "198.19.0.1"', 'backend_gateway = ["198.19.0.1", "2001:db8:19::1"]'
)


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with MULTIHOST_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs; MULTIHOST_UPDATE_GOLDEN=1 regenerates it"


def test_parse_defaults_and_slot_order() -> None:
    cfg = parse_config(BASE, "b.toml")
    (b,) = cfg.backends
    assert (b.name, b.interface, b.table_base, b.rule_priority_base) == ("db1", "eth1", 100, 1000)
    assert b.family == 4
    got = [(p.node, p.slot, str(p.address), str(p.gateway), p.table, p.priority) for p in b.paths]
    assert got == [
        ("A", 0, "198.19.0.101/24", "198.19.0.1", 100, 1000),
        ("C", 2, "198.19.0.103/24", "198.19.0.3", 102, 1002),
        ("B", 5, "198.19.0.102/24", "198.19.0.2", 105, 1005),
    ]


def test_no_backends_is_the_old_configuration() -> None:
    text = "\n".join(
        line
        for line in BASE.split("[[backend]]", maxsplit=1)[0].splitlines()
        if "backend_gateway" not in line
    )
    cfg = parse_config(text)
    assert cfg.backends == ()
    # back ends and gateways do not decide ownership: the heartbeat digest ignores them
    assert cfg.digest() == parse_config(BASE).digest()


def test_example_configuration_has_a_backend() -> None:
    (b,) = load_config(EXAMPLE).backends
    assert b.name == "db1" and [p.table for p in b.paths] == [100, 101, 102]


def test_two_families_two_backends() -> None:
    cfg = parse_config(V6_CFG)
    b6 = find_backend(cfg.backends, "db6", cfg.source)
    assert b6.family == 6
    assert [(p.node, str(p.gateway), p.table, p.priority) for p in b6.paths] == [
        ("A", "2001:db8:19::1", 7600, 20000),
        ("C", "2001:db8:19::3", 7602, 20002),
        ("B", "2001:db8:19::2", 7605, 20005),
    ]
    with pytest.raises(
        ConfigError, match=r"backend: no back end named 'x' \(known: 'db1', 'db6'\)"
    ):
        find_backend(cfg.backends, "x", cfg.source)


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


def test_check_config_lists_backends(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text(BASE)
    assert main(["check-config", str(good), "--no-key", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["backends"]["db1"]["nodes"]["B"] == {
        "address": "198.19.0.102/24",
        "gateway": "198.19.0.2",
        "table": 105,
        "priority": 1005,
    }
    assert main(["check-config", str(good), "--no-key"]) == 0
    assert "198.19.0.102/24 via B's 198.19.0.2 (table 105, rule priority 1005)" in (
        capsys.readouterr().out
    )


# --------------------------------------------------------------------------------- the plan
def test_plan_order_and_steps() -> None:
    pl = plan(parse_config(BASE).backends[0])
    kinds = [(type(s), s.node) for s in pl.steps]
    assert kinds == [(k, n) for n in ("A", "C", "B") for k in (AddressStep, RouteStep, RuleStep)]
    assert pl.removal() == tuple(reversed(pl.steps))
    rule = pl.steps[-1]
    assert isinstance(rule, RuleStep)
    assert (rule.source, rule.table, rule.priority) == (
        ipaddress.ip_address("198.19.0.102"),
        105,
        1005,
    )


def test_golden_text_and_json() -> None:
    pl = plan(parse_config(BASE).backends[0])
    check_golden("backend_routes_apply.sh", render_text(pl))
    check_golden("backend_routes_remove.sh", render_text(pl, remove=True))
    check_golden("backend_routes.json", json.dumps(render_json(pl), indent=2) + "\n")
    b6 = find_backend(parse_config(V6_CFG).backends, "db6", "x")
    check_golden("backend_routes_v6.sh", render_text(plan(b6)))


def test_cli_prints_the_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text(BASE)
    assert main(["backend-routes", "--config", str(path), "--backend", "db1"]) == 0
    assert capsys.readouterr().out == (GOLDEN / "backend_routes_apply.sh").read_text()
    assert main(["backend-routes", "--config", str(path), "--backend", "db1", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    got = json.loads(out)
    assert got["ok"] is True and got["action"] == "plan"
    assert got["steps"] == json.loads((GOLDEN / "backend_routes.json").read_text())["steps"]
    assert "result" not in got["steps"][0] and "changed" not in got


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "nope"], "backend: no back end named 'nope' (known: 'db1')"),
        (["--backend", "db1", "--apply", "--remove"], "not allowed with argument"),
        ([], "the following arguments are required: --backend"),
    ],
)
def test_cli_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(BASE)
    assert main(["backend-routes", "--config", str(path), *args, "--json"]) == 2
    cap = capsys.readouterr()
    got = json.loads(cap.out)
    assert got == {"ok": False, "error": got["error"], "code": 2}
    assert message in got["error"]
    assert cap.err == f"multihost: error: {got['error']}\n"


def test_cli_missing_interface_is_an_operation_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("--apply needs root; without it the command refuses (exit 2) first")
    path = tmp_path / "c.toml"
    path.write_text(BASE.replace('interface = "eth1"', 'interface = "mhb-none0"'))
    assert main(["backend-routes", "--config", str(path), "--backend", "db1", "--apply"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "multihost: error: backend 'db1': no interface 'mhb-none0' on this host (backend "
        "'db1' interface); run --apply on the back end itself\n"
    )


def test_config_reference_documents_the_backend_keys() -> None:
    page = (Path(__file__).parents[2] / "docs" / "man" / "multihost.toml.5").read_text()
    for key in ("backend_gateway", "[[backend]]", "table_base", "rule_priority_base"):
        assert key in page, key
    assert "backend\\-routes" in page
