"""The cluster table: chosen by slot count, identified in the digest, held to backend limits."""

from __future__ import annotations

import dataclasses

import pytest

from multihost import config_model, minwise, preflight
from multihost.assignment import assign, factorial_table
from multihost.config import ConfigError, parse_config
from multihost.tablechoice import (
    NFT_MAX_BUCKETS,
    NFT_MAX_SLOTS,
    XDP_MAX_SLOTS,
    TableChoiceError,
    TableIdentity,
    backend_problem,
    identity,
    table_for,
    table_identity,
)
from tests.unit.test_config import MINIMAL


@pytest.mark.parametrize("n", range(1, 9))
def test_up_to_eight_slots_keep_the_factorial_table(n: int) -> None:
    assert table_for(n) is factorial_table(8)
    assert table_for(n).buckets == 40320


@pytest.mark.parametrize("n", range(9, 17))
def test_nine_to_sixteen_slots_use_the_minwise_family(n: int) -> None:
    t = table_for(n)
    assert t.slots == n
    assert t.buckets == minwise.lcm_upto(n)
    assert t is table_for(n)  # one shared instance
    live = frozenset(range(0, n, 2))
    a = assign(live, t)
    assert all(a.count(s) * len(live) == t.buckets for s in live)


@pytest.mark.parametrize("n", [0, 17])
def test_no_table_outside_one_to_sixteen(n: int) -> None:
    with pytest.raises(TableChoiceError, match=r"1\.\.16"):
        table_for(n)


def test_identity_names_the_orderings() -> None:
    a, b = identity(8), identity(12)
    assert (a.name, a.slots, a.buckets) == ("factorial-8", 8, 40320)
    assert (b.name, b.slots, b.buckets) == ("minwise-12", 12, 27720)
    assert identity(3) == a  # same table, same identity
    assert len({a.sha256, b.sha256, identity(16).sha256}) == 3


def test_backend_limits() -> None:
    assert minwise.lcm_upto(NFT_MAX_SLOTS) <= NFT_MAX_BUCKETS < minwise.lcm_upto(NFT_MAX_SLOTS + 1)
    assert backend_problem(NFT_MAX_SLOTS, "nft") is None
    assert backend_problem(XDP_MAX_SLOTS, "xdp") is None
    problem = backend_problem(13, "nft")
    assert problem is not None
    assert "360,360" in problem and "65,536" in problem and "at most 12" in problem
    assert backend_problem(17, "xdp") is not None


def test_digest_carries_the_table_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_config(MINIMAL, "m.toml")
    before = cfg.digest()
    other = TableIdentity("minwise-8", 8, 840, "0" * 64)
    monkeypatch.setattr(config_model, "table_identity", lambda table: other)
    assert cfg.digest() != before


def _with_top_slot(slot: int, dataplane: str) -> config_model.Config:
    cfg = parse_config(MINIMAL, "m.toml")
    nodes = (cfg.nodes[0], dataclasses.replace(cfg.nodes[1], slot=slot))
    cluster = dataclasses.replace(cfg.cluster, dataplane=dataplane)
    return dataclasses.replace(cfg, nodes=nodes, cluster=cluster)


@pytest.mark.parametrize("dataplane", ["nft", "auto"])
def test_preflight_explains_the_nft_limit(dataplane: str) -> None:
    with pytest.raises(ConfigError) as exc:
        preflight.check(_with_top_slot(12, dataplane))
    assert exc.value.key == "node[1].slot"
    assert "at most 12 slots" in exc.value.reason and "65,536" in exc.value.reason


def test_preflight_takes_thirteen_slots_with_xdp() -> None:
    cfg = _with_top_slot(12, "xdp")
    preflight._table(cfg)  # within XDP's 16
    assert cfg.buckets == 360360


# -- [cluster] table = "minimal": the smallest exact table for every slot count ---------------


@pytest.mark.parametrize("n", range(1, 17))
def test_the_minimal_table_has_lcm_buckets_and_is_exact_for_every_live_set(n: int) -> None:
    t = table_for(n, "minimal")
    assert (t.slots, t.buckets) == (n, minwise.lcm_upto(n))
    if n > 8:
        assert t is table_for(n)  # beyond 8 slots both kinds are the min-wise family
    if n <= 8:
        for mask in range(1, 1 << n):
            live = frozenset(s for s in range(n) if mask >> s & 1)
            a = assign(live, t)
            assert all(a.count(s) * len(live) == t.buckets for s in live), sorted(live)


def test_a_four_slot_minimal_table_is_twelve_buckets() -> None:
    assert table_for(4, "minimal").buckets == 12
    assert table_for(8, "minimal").buckets == 840


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(TableChoiceError, match=r"'huge' is not one of factorial, minimal"):
        table_for(4, "huge")


def test_config_table_key_selects_the_kind_and_changes_the_digest() -> None:
    fact = parse_config(MINIMAL, "m.toml")
    mini = parse_config(MINIMAL.replace('key_file = "key"', 'key_file = "key"\ntable = "minimal"'))
    assert fact.cluster.table == "factorial" and fact.buckets == 40320
    assert mini.cluster.table == "minimal"
    assert (table_identity(mini.table).name, mini.buckets) == (
        "minwise-4",
        12,
    )  # slots 0 and 3: 4 slots
    assert mini.digest() != fact.digest()  # nodes with different tables refuse each other


def test_config_table_key_rejects_an_unknown_kind() -> None:
    with pytest.raises(ConfigError, match=r"cluster\.table: 'small' is not one of"):
        parse_config(MINIMAL.replace('key_file = "key"', 'key_file = "key"\ntable = "small"'))


def test_minimal_weighted_table_is_chosen_by_the_sum_of_weights() -> None:
    from multihost.tablechoice import cluster_table

    t = cluster_table(((0, 2), (1, 1)), "minimal")  # 3 virtual slots
    assert t.buckets == 6
    a = assign(frozenset({0, 1}), t)
    assert (a.count(0), a.count(1)) == (4, 2)
