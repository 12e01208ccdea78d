"""Golden and property tests of the pure nft specs and tables (multihost.dataplane.ruleset,
multihost.dataplane.rulesettables); the bucket updates are ``test_rulesetdelta.py``'s.

Regenerate the golden files after an intended change with
``MULTIHOST_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_ruleset.py`` and review the diff.
"""

from __future__ import annotations

import ast
import dataclasses
import ipaddress
import os
import re
from pathlib import Path
from types import ModuleType

import pytest

from multihost.dataplane import ruleset, rulesetdelta, rulesettables
from multihost.dataplane.ruleset import (
    GroupBuckets,
    GroupSpec,
    ReturnSpec,
    RulesetError,
    RulesetSpec,
    bucket_map,
    check_state,
    handover_map,
    kind_chains,
    map_contents,
)
from multihost.dataplane.rulesettables import (
    jhash_expr,
    render_guard_table,
    render_install,
    render_lease,
    render_owned_table,
    render_remove,
    render_transparent_table,
)
from multihost.flowhash import HashMode, hash_fields

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
UPDATE = os.environ.get("MULTIHOST_UPDATE_GOLDEN") == "1"
ip = ipaddress.ip_address

SPEC = RulesetSpec(
    buckets=40320,
    seed=0x5EED,
    groups=(
        GroupSpec("web", (ip("198.18.1.100"),)),
        GroupSpec("dns", (ip("198.18.1.53"), ip("198.18.1.54")), HashMode.THREE_TUPLE),
        GroupSpec("vpn", (ip("198.18.1.200"), ip("fe80::c612:1c8")), HashMode.SOURCE_IP),
    ),
)
BEFORE = {
    "web": GroupBuckets(owned=frozenset(range(0, 40, 2)), draining=frozenset({100, 101})),
    "dns": GroupBuckets(owned=frozenset({5039, 5040, 40319})),
}
AFTER = {
    "web": GroupBuckets(owned=frozenset(range(0, 44, 2)) - {4}, incoming=frozenset({100})),
    "vpn": GroupBuckets(owned=frozenset({7})),
}


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with MULTIHOST_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs; MULTIHOST_UPDATE_GOLDEN=1 regenerates it"


def test_golden_guard_table() -> None:
    check_golden("ruleset_guard.nft", render_guard_table(SPEC))


def test_golden_owned_table() -> None:
    check_golden("ruleset_owned.nft", render_owned_table(SPEC, BEFORE))


def test_golden_install_and_remove() -> None:
    check_golden("ruleset_install.nft", render_install(SPEC, BEFORE))
    check_golden("ruleset_remove.nft", render_remove(SPEC))


_NFT_FIELD = {
    "ip saddr": "saddr",
    "ip6 saddr": "saddr",
    "ip daddr": "daddr",
    "ip6 daddr": "daddr",
    "th sport": "sport",
    "th dport": "dport",
}


@pytest.mark.parametrize("mode", list(HashMode))
@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("has_ports", [True, False])
def test_hash_expression_follows_the_model(mode: HashMode, family: int, has_ports: bool) -> None:
    group = GroupSpec("g", (ip("198.18.1.1"),), mode)
    expr = jhash_expr(SPEC, group, family, has_ports)
    m = re.fullmatch(r"jhash (.+) mod (\d+) seed (0x[0-9a-f]+)", expr)
    assert m, expr
    fields = tuple(_NFT_FIELD[f] for f in m.group(1).split(" . "))
    assert fields == hash_fields(mode, has_ports)
    prefixes = ("ip6 ", "th ") if family == 6 else ("ip ", "th ")
    assert all(f.startswith(prefixes) for f in m.group(1).split(" . "))
    assert int(m.group(2)) == SPEC.buckets
    assert int(m.group(3), 16) == SPEC.seed


def test_four_tuple_expression_exact() -> None:
    group = GroupSpec("g", (ip("198.18.1.1"),))
    assert (
        jhash_expr(SPEC, group, 4, True)
        == "jhash ip saddr . th sport . ip daddr . th dport mod 40320 seed 0x5eed"
    )


def _chains(text: str) -> dict[str, list[str]]:
    found = re.findall(r"\tchain (\w+) \{\n(.*?)\n\t\}", text, re.S)
    return {name: [r.strip() for r in body.strip().splitlines()] for name, body in found}


def test_owned_table_shape() -> None:
    text = render_owned_table(SPEC, BEFORE)
    assert "\tflags owner\n" in text
    assert "type filter hook prerouting priority -300; policy accept;" in text
    assert "type filter hook prerouting priority -150; policy accept;" in text
    # the only set is the lease (buckets live in maps), held without expiry at install
    assert text.count("\tset ") == 1
    assert "\tset lease {\n\t\ttypeof meta nfproto\n\t\tflags timeout\n" in text
    assert "\t\telements = { ipv4, ipv6 }\n" in text
    for g in SPEC.groups:
        for name, data in ((bucket_map(g), "meta pkttype"), (handover_map(g), "verdict")):
            assert f"\tmap {name} {{\n\t\ttypeof meta length : {data}\n\t\tsize 40320\n" in text
        assert f"counter {g.name}_accepted {{" in text
        assert f"counter {g.name}_dropped {{" in text
    chains = _chains(text)
    # every packet to a traffic IP ends in an explicit verdict in each group chain
    for name, rules in chains.items():
        if not name.startswith("hook_"):
            assert rules[-1].endswith(("drop", "accept")), (name, rules[-1])
        if name.endswith(("4", "6", "_ports", "_incoming")):
            assert rules[-1].endswith("drop"), (name, rules[-1])
    # one hash per packet at -300, through the group's bucket map; -150 may look up the
    # handover map and, when the bucket left it meanwhile, the bucket map
    for name, rules in chains.items():
        if name.startswith("hook_"):
            assert not any("jhash" in r for r in rules)
            continue
        group = name.split("_")[0]
        hashing = [r for r in rules if "jhash" in r]
        serve = f"map @{group}_buckets meta pkttype host meta nfproto @lease counter name"
        if "_raw" in name:
            assert len(hashing) == 1 and serve in hashing[0], name
            # an owned bucket without the lease: tagged, so -150 takes established only
            lapsed = rules[rules.index(hashing[0]) + 1]
            assert lapsed.startswith(
                "meta pkttype host meta nfproto != @lease meta pkttype set other accept"
            )
            assert rules[rules.index(hashing[0]) + 2] == "meta pkttype other accept"
        elif "_ct" in name:
            assert len(hashing) == 2 and hashing[0].endswith(f"vmap @{group}_handover"), name
            assert serve in hashing[1], name
        else:
            assert not hashing, name
    # the -150 chain lets everything untagged go at once and drops stray tagged packets
    assert chains["hook_ct"][1] == "meta pkttype != other accept"
    assert chains["hook_ct"][-1].startswith("meta pkttype other drop")
    assert "iiftype" not in " ".join(chains["hook_raw"])  # only traffic-IP packets check it
    assert chains["web_raw4"][0] == "meta iiftype loopback accept"
    web = kind_chains(SPEC.groups[0])
    assert set(web) == {"draining", "incoming"}
    assert chains[web["draining"]] == [
        'meta l4proto tcp counter name "web_dropped" drop',
        'meta pkttype set host counter name "web_accepted" accept',
    ]
    assert "tcp flags & (fin | syn | rst | ack) == syn ct state new" in chains[web["incoming"]][0]
    assert chains["web_ct4"][0].startswith("ct state established,related meta pkttype set host")
    # source-ip hashes the same with or without ports: no protocol dispatch, no port chains
    assert "vpn_raw4_ports" not in chains and "l4proto" not in " ".join(chains["vpn_raw4"])
    assert "10 : host" in text and "100 : other" in text and "100 : goto web_draining" in text


def test_elements_of_every_kind_in_the_maps() -> None:
    gb = GroupBuckets(owned=frozenset({3}), draining=frozenset({1}), incoming=frozenset({2}))
    text = render_owned_table(SPEC, {"web": gb})
    buckets = text.split("map web_buckets {")[1].split("\t}")[0]
    assert re.findall(r"(\d+) : (\w+)", buckets) == [("1", "other"), ("2", "other"), ("3", "host")]
    handover = text.split("map web_handover {")[1].split("\t}")[0]
    assert re.findall(r"(\d+) : goto (\w+)", handover) == [
        ("1", "web_draining"),
        ("2", "web_incoming"),
    ]
    assert map_contents(SPEC.groups[0], gb) == {
        "web_buckets": {"host": {3}, "other": {1, 2}},
        "web_handover": {"goto web_draining": {1}, "goto web_incoming": {2}},
    }


def test_guard_table_lists_every_traffic_ip_and_uses_conntrack() -> None:
    text = render_guard_table(SPEC)
    assert "flags owner" not in text
    assert "priority -250;" in text
    chains = _chains(text)
    assert set(chains) == {"conntrack", "prerouting"}
    assert chains["conntrack"][0].startswith("ct state ")  # never jumped to: enables ct only
    assert "conntrack" not in " ".join(chains["prerouting"])
    rules = chains["prerouting"][1:]
    assert rules[0] == "meta pkttype host accept"
    assert rules[1].startswith("meta pkttype other accept")
    for g in SPEC.groups:
        for a in g.addresses:
            assert str(a) in " ".join(rules[2:])
    assert all(r.endswith('counter name "dropped" drop') for r in rules[2:])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (RulesetSpec(40320, 1, (GroupSpec("1bad", (ip("198.18.1.1"),)),)), "group name"),
        (RulesetSpec(40320, 1, (GroupSpec("a-b", (ip("198.18.1.1"),)),)), "group name"),
        (RulesetSpec(40320, 1, (GroupSpec("a", ()),)), "no addresses"),
        (RulesetSpec(40320, 1, (GroupSpec("a", (ip("239.192.0.1"),)),)), "cannot be"),
        (
            RulesetSpec(
                40320,
                1,
                (GroupSpec("a", (ip("198.18.1.1"),)), GroupSpec("b", (ip("198.18.1.1"),))),
            ),
            "groups 'a' and 'b'",
        ),
        (
            RulesetSpec(
                40320,
                1,
                (GroupSpec("a", (ip("198.18.1.1"),)), GroupSpec("a", (ip("198.18.1.2"),))),
            ),
            "twice",
        ),
        (RulesetSpec(0, 1, ()), "bucket count"),
        (RulesetSpec(40320, 1 << 32, ()), "seed"),
        (RulesetSpec(40320, 1, (), table="x", guard_table="x"), "different names"),
        (RulesetSpec(40320, 1, (), table="ip"), None),
    ],
)
def test_spec_validation(spec: RulesetSpec, message: str | None) -> None:
    if message is None:
        spec.check()  # a keyword as table name is fine: it is always followed by '{' or EOL
        return
    with pytest.raises(RulesetError, match=message):
        spec.check()


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"nope": GroupBuckets()}, "unknown group"),
        ({"web": GroupBuckets(owned=frozenset({40320}))}, "outside"),
        ({"web": GroupBuckets(owned=frozenset({-1}))}, "outside"),
        ({"web": GroupBuckets(owned=frozenset({1}), draining=frozenset({1}))}, "both"),
        ({"web": GroupBuckets(draining=frozenset({2}), incoming=frozenset({2}))}, "both"),
    ],
)
def test_state_validation(state: dict[str, GroupBuckets], message: str) -> None:
    with pytest.raises(RulesetError, match=message):
        check_state(SPEC, state)
    with pytest.raises(RulesetError, match=message):
        render_owned_table(SPEC, state)


def test_missing_groups_own_nothing() -> None:
    full = check_state(SPEC, {})
    assert set(full) == {"web", "dns", "vpn"}
    assert all(gb == GroupBuckets() for gb in full.values())


def test_elements_are_sorted_and_wrapped() -> None:
    spec = RulesetSpec(100, 0, (GroupSpec("g", (ip("198.18.1.1"),)),))
    text = render_owned_table(spec, {"g": GroupBuckets(owned=frozenset(range(99, -1, -3)))})
    block = text.split("map g_buckets")[1].split("elements = {")[1].split("}")[0]
    numbers = [int(x) for x in re.findall(r"(\d+) : host", block)]
    assert numbers == sorted(range(99, -1, -3))
    assert max(len(line.split(",")) for line in block.strip().splitlines()) <= 9


@pytest.mark.parametrize("module", [ruleset, rulesettables, rulesetdelta])
def test_module_is_pure(module: ModuleType) -> None:
    tree = ast.parse(Path(str(module.__file__)).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert not imported & {"subprocess", "socket", "ctypes", "os", "time", "pyroute2"}


def test_render_lease() -> None:
    assert render_lease(SPEC, None) == (
        "flush set inet multihost lease\nadd element inet multihost lease { ipv4, ipv6 }\n"
    )
    assert render_lease(SPEC, 250) == (
        "flush set inet multihost lease\n"
        "add element inet multihost lease { ipv4 timeout 250ms, ipv6 timeout 250ms }\n"
    )
    assert render_lease(SPEC, 0) == render_lease(SPEC, -5) == "flush set inet multihost lease\n"


# ------------------------------------------------------------------ return groups
RSPEC = RulesetSpec(
    buckets=40320,
    seed=0x5EED,
    groups=(
        GroupSpec("web", (ip("198.18.1.100"), ip("2001:db8::100")), HashMode.SOURCE_IP_PORT),
        GroupSpec("api", (ip("198.18.1.101"),), HashMode.SOURCE_IP),
    ),
    returns=(
        ReturnSpec(
            "web_ret",
            "web",
            (ip("198.19.0.1"), ip("2001:db8:1::1")),
            "eth1",
            HashMode.DESTINATION_IP_PORT,
            ((4, "01:00:5e:40:00:01"), (6, "33:33:00:00:00:01")),
        ),
        ReturnSpec(
            "api_ret",
            "api",
            (ip("198.19.2.1"),),
            "eth2",
            HashMode.DESTINATION_IP,
            ((4, "01:00:5e:40:00:01"),),
        ),
    ),
)


def test_golden_return_groups() -> None:
    state = {"web": GroupBuckets(owned=frozenset({1, 2}), draining=frozenset({3}))}
    check_golden("ruleset_return_owned.nft", render_owned_table(RSPEC, state))
    check_golden("ruleset_return_guard.nft", render_guard_table(RSPEC))


def test_return_group_shares_the_front_maps() -> None:
    chains = _chains(render_owned_table(RSPEC, {}))
    raw = chains["web_ret_raw4_ports"]
    assert raw[0] == (
        "meta pkttype set jhash ip daddr . th dport mod 40320 seed 0x5eed map @web_buckets "
        'meta pkttype host meta nfproto @lease counter name "web_ret_accepted" accept'
    )
    assert chains["web_ret_ct6_ports"][0].startswith(
        "jhash ip6 daddr . th dport mod 40320 seed 0x5eed vmap @web_handover"
    )
    # destination-ip hashes alike with or without ports: no port chains
    assert "api_ret_raw4_ports" not in chains
    assert chains["api_ret_raw4"][-4].startswith("meta pkttype set jhash ip daddr mod 40320")
    # replies are selected by interface, cluster MAC and a unicast destination, after
    # every traffic IP and gateway address
    hook = chains["hook_raw"]
    assert hook[-3:] == [
        'iifname "eth1" ether daddr 01:00:5e:40:00:01 ip daddr != 224.0.0.0/4 goto web_ret_raw4',
        'iifname "eth1" ether daddr 33:33:00:00:00:01 ip6 daddr != ff00::/8 goto web_ret_raw6',
        'iifname "eth2" ether daddr 01:00:5e:40:00:01 ip daddr != 224.0.0.0/4 goto api_ret_raw4',
    ]
    assert "ip daddr 198.19.0.1 goto web_ret_raw4" in hook
    assert chains["hook_ct"][-2].endswith("goto api_ret_ct4")
    # no maps of its own: its state is its front group's
    assert "web_ret_buckets" not in render_owned_table(RSPEC, {})


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"front": "nope"}, "unknown group 'nope'"),
        ({"hash_mode": HashMode.DESTINATION_IP}, "not the return mode of 'web'"),
        ({"hash_mode": HashMode.SOURCE_IP_PORT}, "not a return mode"),
        ({"macs": ((4, "01:00:5e:40:00:01"),)}, "no IPv6 cluster MAC"),
        ({"interface": "eth 1"}, "bad interface"),
        ({"name": "api"}, "appears twice"),
        ({"addresses": (ip("198.18.1.100"),)}, "is in groups 'web' and 'web_ret'"),
        ({"interface": "eth2", "addresses": (ip("198.19.0.1"),)}, "two return groups"),
    ],
)
def test_return_spec_refused(change: dict[str, object], words: str) -> None:
    bad = dataclasses.replace(RSPEC.returns[0], **change)  # type: ignore[arg-type]
    spec = dataclasses.replace(RSPEC, returns=(bad, RSPEC.returns[1]))
    with pytest.raises(RulesetError, match=re.escape(words)):
        spec.check()


def test_golden_transparent_table() -> None:
    text = render_transparent_table(0x4D48)
    check_golden("ruleset_transparent.nft", text)
    assert "socket transparent 1 meta mark set 0x4d48 accept" in text
    assert text.startswith("add table inet multihost_transparent\ndelete table inet")
    for bad in (0, 1 << 32):
        with pytest.raises(RulesetError, match="not a non-zero 32-bit value"):
            render_transparent_table(bad)
