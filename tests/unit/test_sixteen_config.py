"""Configurations beyond 8 nodes and with weights: what parses, what the backends take, and
every bad input refused with one error naming the key and the limit."""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import pytest

from multihost import preflight
from multihost.assignment import assign
from multihost.cli.groupsel import from_config
from multihost.cli.whohas import lookup
from multihost.config import Config, ConfigError, parse_config
from multihost.minwise import lcm_upto
from multihost.ownership import ownership
from multihost.tablechoice import table_for
from tests.unit.test_whohas_config import RenderedNode, random_flows


def cluster(
    n: int,
    *,
    dataplane: str = "xdp",
    weights: Sequence[int] | None = None,
    members: Sequence[str] | None = None,
    slots: Sequence[int] | None = None,
) -> str:
    names = [chr(ord("A") + i) for i in range(n)]
    out = [
        "[cluster]",
        'name = "big"',
        'interface = "eth0"',
        'multicast_group = "239.192.0.1"',
        'key_file = "key"',
        f'dataplane = "{dataplane}"',
    ]
    for i, name in enumerate(names):
        out += ["[[node]]", f'name = "{name}"', f'address = "198.18.0.{10 + i}"']
        out.append(f"slot = {slots[i] if slots else i}")
        if weights is not None:
            out.append(f"weight = {weights[i]}")
    group = list(members) if members is not None else names
    out += ["[[traffic_ip_group]]", 'name = "web"', 'addresses = ["198.18.0.100"]']
    out.append("members = [" + ", ".join(f'"{m}"' for m in group) + "]")
    return "\n".join(out) + "\n"


def load(text: str) -> Config:
    cfg = parse_config(text, "big.toml")
    preflight.check(cfg)
    return cfg


@pytest.mark.parametrize(("n", "dataplane"), [(12, "nft"), (12, "auto"), (16, "xdp")])
def test_up_to_sixteen_nodes_load_with_their_table(n: int, dataplane: str) -> None:
    cfg = load(cluster(n, dataplane=dataplane))
    assert cfg.table is table_for(n) and cfg.buckets == lcm_upto(n)
    own = ownership(cfg, [n.name for n in cfg.nodes])["web"]
    assert set(own.shares(cfg.slots).values()) == {Fraction(1, n)}


def test_eight_nodes_keep_the_factorial_table_and_digest_inputs() -> None:
    cfg = load(cluster(4, dataplane="nft"))
    assert cfg.table.buckets == 40320 and cfg.table is table_for(8)
    assert not cfg.weighted
    assert preflight.ruleset_spec(cfg).buckets == 40320  # the 4-node nft ruleset: unchanged


def test_weights_give_proportional_shares() -> None:
    cfg = load(cluster(5, dataplane="nft", weights=[2, 1, 1, 3, 1]))  # 8 virtual slots
    assert cfg.weighted and cfg.table_slots == 8 and cfg.buckets == 40320
    names = [n.name for n in cfg.nodes]
    shares = ownership(cfg, names)["web"].shares(cfg.slots)
    assert shares == {"A": Fraction(2, 8), "B": Fraction(1, 8), "C": Fraction(1, 8),
                      "D": Fraction(3, 8), "E": Fraction(1, 8)}  # fmt: skip
    without_d = ownership(cfg, [m for m in names if m != "D"])["web"].shares(cfg.slots)
    assert without_d == {"A": Fraction(2, 5), "B": Fraction(1, 5), "C": Fraction(1, 5),
                         "E": Fraction(1, 5)}  # fmt: skip


def test_weights_enter_the_digest() -> None:
    a = parse_config(cluster(3, weights=[1, 1, 1]), "a.toml")
    b = parse_config(cluster(3, weights=[2, 1, 1]), "b.toml")
    c = parse_config(cluster(3), "c.toml")
    assert a.digest() == c.digest()  # weight 1 is the default: the same table
    assert a.digest() != b.digest()  # another table: the nodes refuse each other


def test_weighted_with_sixteen_virtual_slots_needs_xdp() -> None:
    cfg = load(cluster(10, weights=[4, 2, 2, 1, 1, 1, 1, 1, 2, 1]))  # 16 virtual slots
    assert cfg.buckets == lcm_upto(16)
    a = assign(frozenset(cfg.slots.values()), cfg.table)
    assert a.count(0) == 4 * lcm_upto(16) // 16


SEVENTEEN = ["A"] * 17  # the count is checked before the names


@pytest.mark.parametrize(
    ("case", "text", "key", "reason"),
    [
        ("17 members", cluster(2, members=SEVENTEEN), "traffic_ip_group[0].members",
         "17 members, at most 16"),
        ("slot 16", cluster(2, slots=[0, 16]), "node[1].slot", "16 is outside 0..15"),
        ("13 members on nft", cluster(13, dataplane="nft"), "traffic_ip_group[0].members",
         "at most 12 slots"),
        ("13 members on auto", cluster(13, dataplane="auto"), "traffic_ip_group[0].members",
         "at most 12 slots"),
        ("slot 12 on nft", cluster(2, dataplane="nft", slots=[0, 12]), "node[1].slot",
         "at most 12 slots"),
        ("weight 0", cluster(3, weights=[1, 0, 1]), "node[1].weight", "0 is outside 1..16"),
        ("weight 17", cluster(3, weights=[17, 1, 1]), "node[0].weight", "17 is outside 1..16"),
        ("weight not an integer", cluster(2, weights=[1, '"2"']), "node[1].weight",  # type: ignore[list-item]
         "expected an integer"),
        ("weights over 16", cluster(3, weights=[8, 8, 1]), "node[2].weight",
         "add up to 17 (A=8, B=8, C=1); the cluster table (every group's) holds at most 16"),
        ("weights over 12 on nft", cluster(3, dataplane="nft", weights=[6, 6, 1]),
         "traffic_ip_group[0].members", "total weight 13"),
        ("weighted nodes outside the group over 12 on nft",
         cluster(3, dataplane="nft", weights=[6, 6, 1], members=["A", "C"]), "node[2].weight",
         "the weights add up to 13 (A=6, B=6, C=1)"),
    ],
)  # fmt: skip
def test_bad_input_names_key_and_limit(case: str, text: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(text)
    assert info.value.key == key, case
    assert reason in info.value.reason, (case, info.value.reason)


@pytest.mark.parametrize(
    ("n", "weights"),
    [(12, None), (5, [4, 2, 3, 1, 2])],  # 12 slots; 12 virtual slots of 5 weighted nodes
)
def test_rendered_nft_rulesets_serve_each_flow_once_as_whohas_says(
    tmp_path: Path, n: int, weights: list[int] | None
) -> None:
    """Each node's rendered nft owned table (jhash mod 27,720 and its bucket map) evaluated
    for random flows: exactly one node accepts each, the one ``whohas`` names."""
    path = tmp_path / "big.toml"
    path.write_text(cluster(n, dataplane="nft", weights=weights))
    cfg = load(path.read_text())
    assert cfg.buckets == 27720
    group = from_config(str(path), "web")
    names = tuple(x.name for x in cfg.nodes)
    flows = random_flows(2000, n, "198.18.0.100")
    for live in (names, names[1:], names[:-2]):
        nodes = {x: RenderedNode(cfg, x, live, "web") for x in names}
        for flow in flows:
            bucket, owner = lookup(group, live, flow)
            accepting = [x for x, r in nodes.items() if r.bucket(flow) in r.accepts]
            assert accepting == [owner], (live, flow, bucket)
        if weights is not None:
            counts = {x: len(nodes[x].accepts) for x in live}
            total = sum(weights[names.index(x)] for x in live)
            assert counts == {x: 27720 * weights[names.index(x)] // total for x in live}
