"""check-config and the agent accept exactly the same configurations (one load path).

A table of bad configurations, each with one named key wrong, goes to both
``multihost check-config`` and ``multihost agent`` (its host-touching part replaced by a
stub that records that it was reached); both must refuse with the same error line, naming
the file and the key.  The good configuration reaches the agent's start.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import multihost.agent
from multihost import preflight
from multihost.cli import main
from multihost.config import ConfigError, parse_config

KEY = "0123456789abcdef0123456789abcdef"

BASE: dict[str, Any] = {
    "cluster": {
        "name": "web-cluster",
        "interface": "eth0",
        "multicast_group": "239.192.0.1",
        "key_file": "key",
        "hash_seed": "0x5eed1234",
    },
    "node": [
        {"name": "A", "address": "198.18.0.11", "slot": 0},
        {"name": "B", "address": "198.18.0.12", "slot": 1},
        {"name": "C", "address": "198.18.0.13", "slot": 2},
        {"name": "D", "address": "198.18.0.14", "slot": 3},
    ],
    "traffic_ip_group": [
        {"name": "web", "addresses": ["198.18.0.100"], "members": ["A", "B", "C", "D"]},
    ],
}


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str | int):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def to_toml(cfg: dict[str, Any]) -> str:
    out: list[str] = []
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.append(f"[{k}]")
            out += [f"{kk} = {toml_value(vv)}" for kk, vv in v.items()]
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                out.append(f"[[{k}]]")
                out += [f"{kk} = {toml_value(vv)}" for kk, vv in item.items()]
        else:
            out.insert(0, f"{k} = {toml_value(v)}")
        out.append("")
    return "\n".join(out)


Mutation = Callable[[dict[str, Any]], None]


def setk(table: str, index: int | None, key: str, value: Any) -> Mutation:
    def apply(c: dict[str, Any]) -> None:
        t = c[table] if index is None else c[table][index]
        t[key] = value

    return apply


def many_groups(n: int) -> Mutation:
    def apply(c: dict[str, Any]) -> None:
        c["traffic_ip_group"] = [
            {"name": f"g{i}", "addresses": [f"198.19.{i // 250}.{i % 250 + 1}"], "members": ["A"]}
            for i in range(n)
        ]

    return apply


def drop(table: str) -> Mutation:
    def apply(c: dict[str, Any]) -> None:
        del c[table]

    return apply


# (case id, mutation, the key the error must name, a piece of the reason)
CASES: list[tuple[str, Mutation, str, str]] = [
    ("cluster-name", setk("cluster", None, "name", "bad name"), "cluster.name", "bad name"),
    ("interface", setk("cluster", None, "interface", "x" * 16), "cluster.interface", "xxx"),
    (
        "group-not-mcast",
        setk("cluster", None, "multicast_group", "10.0.0.1"),
        "cluster.multicast_group",
        "not a multicast",
    ),
    (
        "group-v6-v4-vip",
        setk("cluster", None, "multicast_group", "ff15::1"),
        "cluster.multicast_group4",
        "is required for the IPv4 traffic IP 198.18.0.100",
    ),
    (
        "group-v6-v4-nodes",
        lambda c: c["cluster"].update(multicast_group="ff15::1", multicast_group4="239.192.0.1"),
        "node[0].address",
        "heartbeats go to cluster.multicast_group ff15::1 (IPv6)",
    ),
    (
        "group-v6-permanent",
        setk("cluster", None, "multicast_group", "ff05::2"),
        "cluster.multicast_group",
        "permanent, well-known group",
    ),
    (
        "group-v6-scope",
        setk("cluster", None, "multicast_group", "ff11::1"),
        "cluster.multicast_group",
        "has scope 1",
    ),
    (
        "group6-not-v6",
        setk("cluster", None, "multicast_group6", "239.192.0.2"),
        "cluster.multicast_group6",
        "is not an IPv6 multicast group",
    ),
    (
        "group4-with-v4-heartbeats",
        setk("cluster", None, "multicast_group4", "239.192.0.2"),
        "cluster.multicast_group4",
        "is already IPv4",
    ),
    (
        "v6-vip-without-group6",
        lambda c: c["traffic_ip_group"][0]["addresses"].append("2001:db8::100"),
        "cluster.multicast_group6",
        "is required for the IPv6 traffic IP 2001:db8::100",
    ),
    (
        "group-link-local",
        setk("cluster", None, "multicast_group", "224.0.0.5"),
        "cluster.multicast_group",
        "link-local",
    ),
    ("port", setk("cluster", None, "port", 0), "cluster.port", "outside 1..65535"),
    (
        "interval",
        setk("cluster", None, "heartbeat_interval_ms", 1),
        "cluster.heartbeat_interval_ms",
        "outside",
    ),
    (
        "dead-after",
        setk("cluster", None, "dead_after_ms", 150),
        "cluster.dead_after_ms",
        "at least 2 x",
    ),
    ("seed-text", setk("cluster", None, "hash_seed", "zz"), "cluster.hash_seed", "'zz'"),
    ("seed-range", setk("cluster", None, "hash_seed", 2**33), "cluster.hash_seed", "32-bit"),
    ("quorum-type", setk("cluster", None, "quorum", "yes"), "cluster.quorum", "a boolean"),
    ("hold", setk("cluster", None, "takeover_hold_ms", -1), "cluster.takeover_hold_ms", "-1"),
    ("rt", setk("cluster", None, "realtime_priority", 100), "cluster.realtime_priority", "100"),
    ("drain", setk("cluster", None, "max_drain_ms", -5), "cluster.max_drain_ms", "-5"),
    (
        "metrics-form",
        setk("cluster", None, "metrics_address", "nope"),
        "cluster.metrics_address",
        "HOST:PORT",
    ),
    ("cluster-unknown", setk("cluster", None, "colour", "red"), "cluster.colour", "unknown key"),
    ("dataplane", setk("cluster", None, "dataplane", "ebpf"), "cluster.dataplane", "'ebpf'"),
    ("xdp-mode", setk("cluster", None, "xdp_mode", "fast"), "cluster.xdp_mode", "'fast'"),
    (
        "pin-root",
        setk("cluster", None, "bpf_pin_root", "bpf"),
        "cluster.bpf_pin_root",
        "absolute path",
    ),
    ("node-name", setk("node", 1, "name", "B!"), "node[1].name", "'B!'"),
    ("node-address", setk("node", 1, "address", "nope"), "node[1].address", "not an IP"),
    ("node-slot-range", setk("node", 1, "slot", 16), "node[1].slot", "outside 0..15"),
    ("node-slot-dup", setk("node", 1, "slot", 0), "node[1].slot", "already node 'A'"),
    ("node-name-dup", setk("node", 1, "name", "A"), "node[1].name", "defined twice"),
    (
        "node-address-dup",
        setk("node", 1, "address", "198.18.0.11"),
        "node[1].address",
        "already node 'A'",
    ),
    ("node-unknown", setk("node", 0, "colour", 2), "node[0].colour", "unknown key"),
    ("no-nodes", drop("node"), "node", "at least one"),
    (
        "tig-addresses-empty",
        setk("traffic_ip_group", 0, "addresses", []),
        "traffic_ip_group[0].addresses",
        "at least one",
    ),
    (
        "tig-address-mcast",
        setk("traffic_ip_group", 0, "addresses", ["239.1.1.1"]),
        "traffic_ip_group[0].addresses[0]",
        "cannot be a traffic IP",
    ),
    (
        "tig-address-node",
        setk("traffic_ip_group", 0, "addresses", ["198.18.0.12"]),
        "traffic_ip_group[0].addresses[0]",
        "node 'B'",
    ),
    (
        "tig-member-unknown",
        setk("traffic_ip_group", 0, "members", ["A", "E"]),
        "traffic_ip_group[0].members[1]",
        "unknown node 'E'",
    ),
    (
        "tig-member-dup",
        setk("traffic_ip_group", 0, "members", ["A", "A"]),
        "traffic_ip_group[0].members[1]",
        "listed twice",
    ),
    (
        "tig-hash",
        setk("traffic_ip_group", 0, "hash", "5-tuple"),
        "traffic_ip_group[0].hash",
        "'5-tuple'",
    ),
    ("no-groups", drop("traffic_ip_group"), "traffic_ip_group", "at least one"),
    # Refused by the agent's later checks, which check-config used to skip (issue 12):
    (
        "tig-name-dash",
        setk("traffic_ip_group", 0, "name", "web-1"),
        "traffic_ip_group[0].name",
        "'web-1': use a letter",
    ),
    (
        "tig-name-digit",
        setk("traffic_ip_group", 0, "name", "1web"),
        "traffic_ip_group[0].name",
        "'1web': use a letter",
    ),
    (
        "node-address-v6",
        setk("node", 2, "address", "2001:db8::13"),
        "node[2].address",
        "so node addresses must be IPv4 too",
    ),
    ("groups-513", many_groups(513), "traffic_ip_group", "513 groups configured, at most 512"),
    (
        "lease-margin",
        lambda c: c["cluster"].update(
            heartbeat_interval_ms=10, dead_after_ms=40, lease_margin_ms=20
        ),
        "cluster.lease_margin_ms",
        "20 ms cannot hold",
    ),
    (
        "control-socket-long",
        setk("cluster", None, "control_socket", "/run/" + "s" * 120),
        "cluster.control_socket",
        "at most 107",
    ),
    (
        "metrics-port",
        setk("cluster", None, "metrics_address", "127.0.0.1:99999"),
        "cluster.metrics_address",
        "port 99999 is outside 1..65535",
    ),
    # The key file (both read it: the agent outside manual mode, check-config without --no-key)
    ("key-missing", setk("cluster", None, "key_file", "absent"), "cluster.key_file", "absent"),
]


@pytest.fixture
def agent_stub(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``multihost agent`` up to the point where it would touch the host."""
    reached: list[str] = []

    class Stub:
        def __init__(self, cfg: Any, node: str, **_: Any) -> None:
            reached.append(node)

        async def run(self) -> int:
            return 0

    monkeypatch.setattr(multihost.agent, "Agent", Stub)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    return reached


def write(tmp_path: Path, cfg: dict[str, Any], key: bytes = KEY.encode()) -> Path:
    (tmp_path / "key").write_bytes(key)
    (tmp_path / "key").chmod(0o600)
    path = tmp_path / "multihost.toml"
    path.write_text(to_toml(cfg))
    return path


def both(capsys: pytest.CaptureFixture[str], path: Path) -> tuple[tuple[int, str], ...]:
    rc1 = main(["check-config", str(path)])
    err1 = capsys.readouterr().err
    rc2 = main(["agent", "--config", str(path), "--node", "A"])
    err2 = capsys.readouterr().err
    return (rc1, err1), (rc2, err2)


def fresh() -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(BASE))
    return out


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)


def test_good_config_is_accepted_by_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], agent_stub: list[str]
) -> None:
    path = write(tmp_path, fresh())
    (rc1, err1), (rc2, err2) = both(capsys, path)
    assert (rc1, rc2) == (0, 0), (err1, err2)
    assert agent_stub == ["A"]


@pytest.mark.parametrize("row", CASES, ids=[c[0] for c in CASES])
def test_bad_config_same_refusal(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    agent_stub: list[str],
    row: tuple[str, Mutation, str, str],
) -> None:
    case, mutate, key, reason = row
    cfg = fresh()
    mutate(cfg)
    path = write(tmp_path, cfg)
    (rc1, err1), (rc2, err2) = both(capsys, path)
    assert agent_stub == [], f"{case}: the agent would have started"
    assert rc1 == rc2 == 2
    assert err1 == err2, f"{case}: check-config and agent disagree"
    assert err1.count("\n") == 1
    assert err1.startswith(f"multihost: error: {path}: {key}: "), err1
    assert reason in err1


def test_key_file_permissions_same_refusal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], agent_stub: list[str]
) -> None:
    path = write(tmp_path, fresh())
    (tmp_path / "key").chmod(0o644)
    (rc1, err1), (rc2, err2) = both(capsys, path)
    assert rc1 == rc2 == 2 and err1 == err2 and agent_stub == []
    assert "cluster.key_file" in err1 and "chmod 600" in err1


def test_bad_config_json_names_file_key_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = fresh()
    cfg["traffic_ip_group"][0]["name"] = "web-1"
    path = write(tmp_path, cfg)
    assert main(["check-config", str(path), "--json"]) == 2
    got = json.loads(capsys.readouterr().out)
    assert got["valid"] is False and got["ok"] is False and got["code"] == 2
    assert got["error"]["file"] == str(path)
    assert got["error"]["key"] == "traffic_ip_group[0].name"
    assert "'web-1'" in got["error"]["reason"]
    assert got["message"] == f"{path}: traffic_ip_group[0].name: {got['error']['reason']}"


def test_no_key_skips_only_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = fresh()
    cfg["cluster"]["key_file"] = "absent"
    path = write(tmp_path, cfg)
    assert main(["check-config", str(path), "--no-key"]) == 0
    cfg["traffic_ip_group"][0]["name"] = "web-1"
    path = write(tmp_path, cfg)
    assert main(["check-config", str(path), "--no-key"]) == 2
    assert "traffic_ip_group[0].name" in capsys.readouterr().err


def test_manual_agent_skips_the_key_not_the_checks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], agent_stub: list[str]
) -> None:
    cfg = fresh()
    cfg["cluster"]["key_file"] = "absent"
    path = write(tmp_path, cfg)
    assert main(["agent", "--config", str(path), "--node", "A", "--manual"]) == 0
    cfg["node"][1]["address"] = "2001:db8::12"
    path = write(tmp_path, cfg)
    assert main(["agent", "--config", str(path), "--node", "A", "--manual"]) == 2
    assert "node[1].address" in capsys.readouterr().err
    assert agent_stub == ["A"]


def test_check_is_the_agents_specs() -> None:
    """preflight builds the very specs the agent runs (no copy): same objects, same checks."""
    cfg = parse_config(to_toml(fresh()), "x.toml")
    spec = preflight.ruleset_spec(cfg)
    assert vars(multihost.agent)["ruleset_spec"] is preflight.ruleset_spec
    assert [g.name for g in spec.groups] == ["web"]
    assert spec.seed == 0x5EED1234
    m = preflight.membership_config(cfg, "B", KEY.encode())
    assert m.members == {"A": 0, "B": 1, "C": 2, "D": 3} and m.slot == 1
    bad = fresh()
    bad["traffic_ip_group"][0]["name"] = "web-1"
    with pytest.raises(ConfigError, match=re.escape("traffic_ip_group[0].name")):
        preflight.check(parse_config(to_toml(bad), "x.toml"))


def test_unavailable_xdp_same_refusal(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    agent_stub: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from multihost.dataplane import xdpobject

    monkeypatch.setattr(xdpobject, "unavailable_reason", lambda: "no BTF (test)")
    cfg = fresh()
    cfg["cluster"]["dataplane"] = "xdp"
    path = write(tmp_path, cfg)
    (rc1, err1), (rc2, err2) = both(capsys, path)
    assert rc1 == rc2 == 2 and err1 == err2 and agent_stub == []
    assert (
        err1
        == f'multihost: error: {path}: cluster.dataplane: "xdp" cannot run here: no BTF (test)\n'
    )
    # whohas computes from the file only: the host's XDP support does not matter
    flow = "198.18.0.2:1-198.18.0.100:80"
    assert main(["whohas", "--config", str(path), "--live", "A", "--flow", flow]) == 0
