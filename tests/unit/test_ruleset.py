"""Golden and property tests of the pure nft renderer (multihost.dataplane.ruleset).

Regenerate the golden files after an intended change with
``MULTIHOST_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_ruleset.py`` and review the diff.
"""

from __future__ import annotations

import ast
import ipaddress
import json
import os
import re
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multihost.dataplane import ruleset
from multihost.dataplane.nft import encode_element_batch
from multihost.dataplane.ruleset import (
    GroupBuckets,
    GroupSpec,
    RulesetError,
    RulesetSpec,
    bucket_delta,
    check_state,
    jhash_expr,
    render_delta,
    render_delta_json,
    render_guard_table,
    render_install,
    render_owned_table,
    render_remove,
    render_update,
    set_names,
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


def test_golden_update_text_and_json() -> None:
    check_golden("ruleset_update.nft", render_update(SPEC, BEFORE, AFTER))
    check_golden("ruleset_update.json", render_delta_json(SPEC, bucket_delta(SPEC, BEFORE, AFTER)))


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


def test_owned_table_shape() -> None:
    text = render_owned_table(SPEC, BEFORE)
    assert "\tflags owner\n" in text
    assert "type filter hook prerouting priority -300; policy accept;" in text
    assert "type filter hook prerouting priority -150; policy accept;" in text
    for g in SPEC.groups:
        for name in set_names(g).values():
            assert f"\tset {name} {{\n\t\ttypeof meta length\n\t\tsize 40320\n" in text
        assert f"counter {g.name}_accepted {{" in text
        assert f"counter {g.name}_dropped {{" in text
    # every packet to a traffic IP ends in an explicit verdict in each group chain
    chains = re.findall(r"\tchain (\w+) \{\n(.*?)\n\t\}", text, re.S)
    for name, body in chains:
        if name.startswith("hook_"):
            continue
        last = body.strip().splitlines()[-1].strip()
        assert last.endswith("drop"), (name, last)
    assert "meta pkttype set host accept" in text
    assert "tcp flags & (fin | syn | rst | ack) == syn ct state new" in text


def test_guard_table_lists_every_traffic_ip_and_uses_conntrack() -> None:
    text = render_guard_table(SPEC)
    assert "flags owner" not in text
    assert "priority -250;" in text
    assert re.search(r"^\t\tct state ", text, re.M)
    for g in SPEC.groups:
        for a in g.addresses:
            assert str(a) in text
    assert "meta pkttype != host" in text


def test_update_removes_before_adding() -> None:
    lines = render_update(SPEC, BEFORE, AFTER).splitlines()
    verbs = [line.split()[0] for line in lines]
    assert verbs == sorted(verbs, key=lambda v: v != "delete")
    assert "delete" in verbs and "add" in verbs


def test_noop_update_is_empty() -> None:
    assert render_update(SPEC, BEFORE, BEFORE) == ""
    assert render_delta_json(SPEC, bucket_delta(SPEC, BEFORE, dict(BEFORE))) == ""


def _apply(before: dict[str, GroupBuckets], delta: ruleset.Delta) -> dict[str, set[int]]:
    sets: dict[str, set[int]] = {}
    for g in SPEC.groups:
        for kind, name in set_names(g).items():
            sets[name] = set(before.get(g.name, GroupBuckets()).of(kind))
    for name, values in delta.removed.items():
        assert set(values) <= sets[name]
        sets[name] -= set(values)
    for name, values in delta.added.items():
        assert not set(values) & sets[name]
        sets[name] |= set(values)
    return sets


_buckets = st.frozensets(st.integers(0, 199), max_size=60)


@st.composite
def _states(draw: st.DrawFn) -> dict[str, GroupBuckets]:
    out: dict[str, GroupBuckets] = {}
    for g in ("web", "dns", "vpn"):
        if draw(st.booleans()):
            owned = draw(_buckets)
            draining = draw(_buckets) - owned
            incoming = draw(_buckets) - owned - draining
            out[g] = GroupBuckets(owned, draining, incoming)
    return out


@settings(max_examples=150, deadline=None)
@given(_states(), _states())
def test_delta_transforms_before_into_after(
    before: dict[str, GroupBuckets], after: dict[str, GroupBuckets]
) -> None:
    delta = bucket_delta(SPEC, before, after)
    got = _apply(before, delta)
    for g in SPEC.groups:
        for kind, name in set_names(g).items():
            assert got[name] == set(after.get(g.name, GroupBuckets()).of(kind))
    text = render_delta(SPEC, delta)
    assert text.count("{") == len(delta.removed) + len(delta.added)
    doc = json.loads(render_delta_json(SPEC, delta) or '{"nftables": []}')
    as_json = {
        (verb, c[verb]["element"]["name"]): tuple(c[verb]["element"]["elem"])
        for c in doc["nftables"]
        for verb in c
    }
    expected = {("delete", n): v for n, v in delta.removed.items()}
    expected |= {("add", n): v for n, v in delta.added.items()}
    assert as_json == expected


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
    block = text.split("elements = {")[1].split("}")[0]
    numbers = [int(x) for x in re.findall(r"\d+", block)]
    assert numbers == sorted(range(99, -1, -3))
    assert max(len(line.split(",")) for line in block.strip().splitlines()) <= 17


def test_module_is_pure() -> None:
    tree = ast.parse(Path(ruleset.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert not imported & {"subprocess", "socket", "ctypes", "os", "time", "pyroute2"}


def _parse_batch(data: bytes) -> list[tuple[int, int, int, dict[int, bytes]]]:
    """(type, flags, seq, top-level attributes) of every message in a netlink batch."""
    out = []
    off = 0
    while off < len(data):
        size, kind, flags, seq, _ = struct.unpack_from("=IHHII", data, off)
        attrs: dict[int, bytes] = {}
        a = off + 20  # nlmsghdr + nfgenmsg
        while a < off + size:
            alen, atype = struct.unpack_from("=HH", data, a)
            attrs[atype & 0x3FFF] = data[a + 4 : a + alen]
            a += (alen + 3) & ~3
        out.append((kind, flags, seq, attrs))
        off += size
    return out


def test_netlink_element_batch_encoding() -> None:
    delta = ruleset.Delta(removed={"web_owned": (1, 2)}, added={"web_draining": tuple(range(5000))})
    data, acks = encode_element_batch("multihost", delta, 100)
    msgs = _parse_batch(data)
    assert [m[0] for m in msgs] == [0x10, (10 << 8) | 14, *[(10 << 8) | 12] * 3, 0x11]
    assert [m[2] for m in msgs] == list(range(100, 106)) and acks == [101, 102, 103, 104]
    assert all(m[1] & 0x4 for m in msgs[1:-1])  # NLM_F_ACK on every element message
    assert msgs[1][3][1] == b"multihost\0" and msgs[1][3][2] == b"web_owned\0"
    values: list[int] = []
    for _, _, _, attrs in msgs[2:-1]:
        assert attrs[2] == b"web_draining\0"
        elems = attrs[3]
        assert len(elems) % 16 == 0
        values += [struct.unpack_from("=I", elems, i + 12)[0] for i in range(0, len(elems), 16)]
    assert values == list(range(5000))
    removed = msgs[1][3][3]
    assert [struct.unpack_from("=I", removed, i + 12)[0] for i in (0, 16)] == [1, 2]
