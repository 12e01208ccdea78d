"""IP transparency in the configuration: transparent groups, return groups, [transparency].

Table-driven: every combination that cannot be symmetric is refused with one error naming
its key (``multihost.transparency``); the accepted ones parse to what the data planes use.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from multihost.config import ConfigError, parse_config
from multihost.flowhash import HashMode
from multihost.transparency import DEFAULT_FWMARK, DEFAULT_RULE_PRIORITY, DEFAULT_TABLE

HEAD = """
[cluster]
name = "c"
interface = "eth0"
multicast_group = "239.192.0.1"
key_file = "/etc/multihost/key"

[[node]]
name = "A"
address = "198.18.0.11"
slot = 0
backend_gateway = "198.19.0.11"
[[node]]
name = "B"
address = "198.18.0.12"
slot = 1
backend_gateway = "198.19.0.12"
[[node]]
name = "C"
address = "198.18.0.13"
slot = 2
backend_gateway = "198.19.0.13"
"""

FRONT = """
[[traffic_ip_group]]
name = "web"
addresses = ["198.18.0.100"]
members = ["A", "B", "C"]
hash = "{hash}"
transparent = true
return = "gateway"
{front_extra}
"""

RETURN = """
[[traffic_ip_group]]
name = "web_return"
return_for = "web"
addresses = ["198.19.0.1"]
interface = "eth1"
{return_extra}
"""

BACKEND = """
[[backend]]
name = "db1"
interface = "eth1"
addresses = { A = "198.19.0.101/24", B = "198.19.0.102/24", C = "198.19.0.103/24" }
"""


def gateway_config(
    hash: str = "source-ip-port", front_extra: str = "", return_extra: str = ""
) -> str:
    return (
        HEAD
        + FRONT.format(hash=hash, front_extra=front_extra)
        + RETURN.format(return_extra=return_extra)
    )


def test_gateway_mode_parses() -> None:
    cfg = parse_config(gateway_config())
    (web,) = cfg.groups
    assert web.transparent and web.return_way == "gateway"
    assert web.hash is HashMode.SOURCE_IP_PORT
    (r,) = cfg.returns
    assert r.name == "web_return" and r.front == "web" and r.interface == "eth1"
    assert r.addresses == (ipaddress.ip_address("198.19.0.1"),)
    assert r.members == ("A", "B", "C")
    assert r.hash is HashMode.DESTINATION_IP_PORT
    assert cfg.front_of(r) is web
    t = cfg.transparency
    assert t is not None
    assert (t.fwmark, t.table, t.rule_priority) == (
        DEFAULT_FWMARK,
        DEFAULT_TABLE,
        DEFAULT_RULE_PRIORITY,
    )


def test_address_only_variant_and_explicit_keys() -> None:
    cfg = parse_config(
        gateway_config(
            "source-ip",
            return_extra='members = ["C", "A", "B"]\nhash = "destination-ip"',
        )
        + "[transparency]\nfwmark = 0x10\ntable = 77\nrule_priority = 99\n"
    )
    (r,) = cfg.returns
    assert r.hash is HashMode.DESTINATION_IP
    assert cfg.transparency is not None and cfg.transparency.table == 77


def test_return_interface_defaults_to_the_cluster_interface() -> None:
    text = gateway_config().replace('interface = "eth1"\n', "")
    assert parse_config(text).returns[0].interface == "eth0"


def test_routes_mode_with_backends() -> None:
    text = HEAD + FRONT.format(hash="4-tuple", front_extra="").replace(
        'return = "gateway"', 'return = "routes"'
    )
    cfg = parse_config(text + BACKEND)
    assert cfg.groups[0].return_way == "routes" and not cfg.returns
    # the default of a transparent group is routes
    cfg = parse_config(text.replace('return = "routes"\n', "") + BACKEND)
    assert cfg.groups[0].return_way == "routes"


def test_return_groups_change_the_digest() -> None:
    with_return = parse_config(gateway_config())
    other = parse_config(gateway_config().replace("198.19.0.1", "198.19.0.2"))
    assert with_return.digest() != other.digest()


def test_no_transparency_keeps_the_old_digest() -> None:
    plain = HEAD + '[[traffic_ip_group]]\nname = "web"\naddresses = ["198.18.0.100"]\n'
    plain += 'members = ["A", "B", "C"]\n'
    cfg = parse_config(plain)
    assert not cfg.returns and not cfg.groups[0].transparent and cfg.groups[0].return_way == ""


ROUTES = HEAD + FRONT.format(hash="4-tuple", front_extra="").replace('return = "gateway"\n', "")

# (configuration text, key of the error, words the reason must contain)
BAD: list[tuple[str, str, str, str]] = [
    (
        "4-tuple cannot be symmetric",
        gateway_config("4-tuple"),
        "traffic_ip_group[0].hash",
        'cannot be symmetric with return = "gateway"',
    ),
    (
        "3-tuple cannot be symmetric",
        gateway_config("3-tuple"),
        "traffic_ip_group[0].hash",
        "source-ip-port",
    ),
    (
        "a destination mode on a front group",
        gateway_config("destination-ip-port"),
        "traffic_ip_group[0].hash",
        "hash of a return group",
    ),
    (
        "return without transparent",
        gateway_config().replace("transparent = true\n", ""),
        "traffic_ip_group[0].return",
        "set transparent = true",
    ),
    (
        "unknown return way",
        gateway_config().replace('return = "gateway"', 'return = "tunnel"'),
        "traffic_ip_group[0].return",
        "'tunnel' is not one of",
    ),
    (
        "gateway without a return group",
        HEAD + FRONT.format(hash="source-ip-port", front_extra=""),
        "traffic_ip_group[0].return",
        'return_for = "web"',
    ),
    (
        "routes without back ends",
        ROUTES,
        "traffic_ip_group[0].return",
        "needs the back ends in [[backend]]",
    ),
    (
        "a back end without an address per node (routes mode)",
        ROUTES + BACKEND.replace(', C = "198.19.0.103/24"', ""),
        "backend[0].addresses",
        "no address for node 'C'",
    ),
    (
        "return group for an unknown group",
        gateway_config().replace('return_for = "web"', 'return_for = "api"'),
        "traffic_ip_group[1].return_for",
        "'api' is not a front group",
    ),
    (
        "return group of a group that is not in gateway mode",
        gateway_config().replace('return = "gateway"', 'return = "routes"') + BACKEND,
        "traffic_ip_group[1].return_for",
        'return = "gateway"',
    ),
    (
        "return group with other members",
        gateway_config(return_extra='members = ["A", "B"]'),
        "traffic_ip_group[1].members",
        "exactly its front group's members",
    ),
    (
        "return group with a member twice",
        gateway_config(return_extra='members = ["A", "B", "C", "C"]'),
        "traffic_ip_group[1].members",
        "exactly its front group's members",
    ),
    (
        "return group with another seed",
        gateway_config(return_extra="hash_seed = 7"),
        "traffic_ip_group[1].hash_seed",
        "cluster.hash_seed",
    ),
    (
        "return group with another table",
        gateway_config(return_extra="table = 5"),
        "traffic_ip_group[1].table",
        "chosen by slot count",
    ),
    (
        "return group with a hash that is not the mirror",
        gateway_config(return_extra='hash = "destination-ip"'),
        "traffic_ip_group[1].hash",
        'only with "destination-ip-port"',
    ),
    (
        "return group with the front's own hash",
        gateway_config(return_extra='hash = "source-ip-port"'),
        "traffic_ip_group[1].hash",
        "is not the return mode",
    ),
    (
        "return group that is transparent itself",
        gateway_config(return_extra="transparent = true"),
        "traffic_ip_group[1].transparent",
        "remove this key",
    ),
    (
        "gateway address that is a node's address",
        gateway_config().replace('"198.19.0.1"', '"198.18.0.12"'),
        "traffic_ip_group[1].addresses[0]",
        "node 'B'",
    ),
    (
        "gateway address that is a front traffic IP",
        gateway_config().replace('"198.19.0.1"', '"198.18.0.100"'),
        "traffic_ip_group[1].addresses[0]",
        "already in group 'web'",
    ),
    (
        "gateway address that is a back end's address",
        gateway_config().replace('"198.19.0.1"', '"198.19.0.101"') + BACKEND,
        "backend[0].addresses.A",
        "a traffic IP of group 'web_return'",
    ),
    (
        "two return groups on one interface and family",
        gateway_config()
        + RETURN.format(return_extra="").replace("web_return", "web_r2").replace("0.1", "0.2"),
        "traffic_ip_group[2].interface",
        "one return group per interface and family",
    ),
    (
        "return group name taken",
        gateway_config().replace('name = "web_return"', 'name = "web"'),
        "traffic_ip_group[1].name",
        "defined twice",
    ),
    (
        "only return groups",
        HEAD + RETURN.format(return_extra=""),
        "traffic_ip_group",
        "without return_for",
    ),
    (
        "bad return interface",
        gateway_config().replace('"eth1"', '"eth/1"'),
        "traffic_ip_group[1].interface",
        "not a valid interface name",
    ),
    (
        "IPv6 gateway without an IPv6 group for its MAC",
        gateway_config().replace('"198.19.0.1"', '"2001:db8:1::1"'),
        "cluster.multicast_group6",
        "web_return",
    ),
    (
        "transparency table reserved",
        gateway_config() + "[transparency]\ntable = 254\n",
        "transparency.table",
        "kernel's tables",
    ),
    (
        "transparency unknown key",
        gateway_config() + "[transparency]\nmark = 1\n",
        "transparency.mark",
        "unknown key",
    ),
    (
        "transparency priority out of range",
        gateway_config() + "[transparency]\nrule_priority = 32766\n",
        "transparency.rule_priority",
        "outside 1..32765",
    ),
]


@pytest.mark.parametrize(("text", "key", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_refused(text: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(text, "multihost.toml")
    assert e.value.key == key, str(e.value)
    assert words in e.value.reason, str(e.value)
    assert str(e.value).startswith(f"multihost.toml: {key}: ")


def test_config_reference_documents_the_transparency_keys() -> None:
    page = (Path(__file__).parents[2] / "docs" / "man" / "multihost.toml.5").read_text()
    for key in ("transparent", "return_for", "[transparency]", "fwmark", "rule_priority"):
        assert key in page, key
    for mode in ("source\\-ip\\-port", "destination\\-ip\\-port"):
        assert mode in page, mode


def test_check_config_reports_transparency(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from multihost.cli import main

    p = tmp_path / "m.toml"
    p.write_text(gateway_config())
    assert main(["check-config", "--no-key", "--json", str(p)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["groups"]["web"]["transparent"] is True
    assert out["groups"]["web"]["return"] == "gateway"
    assert out["return_groups"]["web_return"] == {
        "return_for": "web",
        "addresses": ["198.19.0.1"],
        "interface": "eth1",
        "members": ["A", "B", "C"],
        "hash": "destination-ip-port",
    }
    assert out["transparency"] == {"fwmark": 0x4D48, "table": 4248, "rule_priority": 4248}
    p.write_text(gateway_config("4-tuple"))
    assert main(["check-config", "--no-key", "--json", str(p)]) == 2
    err = json.loads(capsys.readouterr().out)
    assert err["valid"] is False and err["error"]["key"] == "traffic_ip_group[0].hash"
