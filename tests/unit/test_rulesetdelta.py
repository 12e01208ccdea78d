"""Tests of the bucket updates (multihost.dataplane.rulesetdelta) and of their netlink
encoding (multihost.dataplane.netlink): golden scripts, deltas that turn one state into the
other, and the batch a :class:`Delta` becomes.

Regenerate the golden files after an intended change with
``MULTIHOST_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_rulesetdelta.py`` and review the
diff.
"""

from __future__ import annotations

import json
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from multihost.dataplane.netlink import encode_element_batch
from multihost.dataplane.ruleset import GroupBuckets, map_contents
from multihost.dataplane.rulesetdelta import (
    Delta,
    bucket_delta,
    render_delta,
    render_delta_json,
    render_update,
)
from tests.unit.test_ruleset import AFTER, BEFORE, SPEC, check_golden


def test_golden_update_text_and_json() -> None:
    check_golden("ruleset_update.nft", render_update(SPEC, BEFORE, AFTER))
    check_golden("ruleset_update.json", render_delta_json(SPEC, bucket_delta(SPEC, BEFORE, AFTER)))


def test_update_removes_before_adding() -> None:
    lines = render_update(SPEC, BEFORE, AFTER).splitlines()
    verbs = [line.split()[0] for line in lines]
    assert verbs == sorted(verbs, key=lambda v: v != "delete")
    assert "delete" in verbs and "add" in verbs


def test_noop_update_is_empty() -> None:
    assert render_update(SPEC, BEFORE, BEFORE) == ""
    assert render_delta_json(SPEC, bucket_delta(SPEC, BEFORE, dict(BEFORE))) == ""


def _contents(state: dict[str, GroupBuckets]) -> dict[str, dict[int, str]]:
    """Map name -> key -> data, as the kernel would hold ``state``."""
    maps: dict[str, dict[int, str]] = {}
    for g in SPEC.groups:
        for name, by_data in map_contents(g, state.get(g.name, GroupBuckets())).items():
            maps[name] = {k: d for d, keys in by_data.items() for k in keys}
    return maps


def _apply(before: dict[str, GroupBuckets], delta: Delta) -> dict[str, dict[int, str]]:
    maps = _contents(before)
    for name, keys in delta.removed.items():
        assert set(keys) <= set(maps[name])
        for k in keys:
            del maps[name][k]
    for (name, data), keys in delta.added.items():
        assert not set(keys) & set(maps[name])
        maps[name].update(dict.fromkeys(keys, data))
    return maps


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
    assert _apply(before, delta) == _contents(after)
    # nothing is deleted and re-added with the same data
    for (name, data), keys in delta.added.items():
        old = _contents(before)[name]
        assert not [k for k in keys if old.get(k) == data]
    text = render_delta(SPEC, delta)
    assert text.count("{") == len(delta.removed) + len(delta.added)
    doc = json.loads(render_delta_json(SPEC, delta) or '{"nftables": []}')
    as_json: dict[tuple[str, str], tuple[int, ...]] = {}
    for c in doc["nftables"]:
        for verb, cmd in c.items():
            e = cmd["element"]
            if verb == "delete":
                as_json[("delete", e["name"])] = tuple(e["elem"])
                continue
            values = {
                v if isinstance(v, str) else f"goto {v['goto']['target']}" for _, v in e["elem"]
            }
            assert len(values) == 1
            as_json[(e["name"], values.pop())] = tuple(k for k, _ in e["elem"])
    expected = {("delete", n): v for n, v in delta.removed.items()}
    expected |= dict(delta.added)
    assert as_json == expected


def test_kind_change_is_delete_then_add() -> None:
    before = {"web": GroupBuckets(owned=frozenset({1, 2, 3}), incoming=frozenset({4}))}
    after = {"web": GroupBuckets(owned=frozenset({1}), draining=frozenset({2, 4}))}
    delta = bucket_delta(SPEC, before, after)
    assert delta.removed == {"web_buckets": (2, 3), "web_handover": (4,)}
    assert delta.added == {
        ("web_buckets", "other"): (2,),
        ("web_handover", "goto web_draining"): (2, 4),
    }
    assert render_delta(SPEC, delta) == (
        "delete element inet multihost web_buckets { 2, 3 }\n"
        "delete element inet multihost web_handover { 4 }\n"
        "add element inet multihost web_buckets { 2 : other }\n"
        "add element inet multihost web_handover { 2 : goto web_draining, 4 : goto web_draining }\n"
    )


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


def _attrs(data: bytes) -> list[tuple[int, bytes]]:
    out, a = [], 0
    while a < len(data):
        alen, atype = struct.unpack_from("=HH", data, a)
        out.append((atype & 0x3FFF, data[a + 4 : a + alen]))
        a += (alen + 3) & ~3
    return out


def _elements_of(nest: bytes) -> list[tuple[int, str | None]]:
    """(key, data as nft writes it, or None) of each NFTA_LIST_ELEM, attribute by attribute."""
    names = {0: "host", 3: "other"}
    out: list[tuple[int, str | None]] = []
    for kind, elem in _attrs(nest):
        assert kind == 1
        parts = dict(_attrs(elem))
        (value,) = [v for k, v in _attrs(parts[1]) if k == 1]
        data = None
        if 2 in parts:
            ((dkind, payload),) = _attrs(parts[2])
            if dkind == 1:  # NFTA_DATA_VALUE: one byte, a pkttype
                assert len(payload) == 1
                data = names[payload[0]]
            else:  # NFTA_DATA_VERDICT
                assert dkind == 2
                fields = dict(_attrs(payload))
                assert struct.unpack(">i", fields[1])[0] == -4  # NFT_GOTO
                data = "goto " + fields[2].rstrip(b"\0").decode()
        out.append((struct.unpack("=I", value)[0], data))
    return out


def test_netlink_element_batch_encoding() -> None:
    delta = Delta(
        removed={"web_buckets": (1, 2)},
        added={
            ("web_buckets", "host"): tuple(range(5000)),
            ("web_buckets", "other"): (7, 8),
            ("web_handover", "goto web_draining"): (7, 8),
        },
    )
    data, acks = encode_element_batch("multihost", delta, 100)
    msgs = _parse_batch(data)
    assert [m[0] for m in msgs] == [0x10, (10 << 8) | 14, *[(10 << 8) | 12] * 5, 0x11]
    assert [m[2] for m in msgs] == list(range(100, 108)) and acks == list(range(101, 107))
    assert all(m[1] & 0x4 for m in msgs[1:-1])  # NLM_F_ACK on every element message
    assert msgs[1][3][1] == b"multihost\0" and msgs[1][3][2] == b"web_buckets\0"
    assert _elements_of(msgs[1][3][3]) == [(1, None), (2, None)]
    added: list[tuple[int, str | None]] = []
    for _, _, _, attrs in msgs[2:5]:
        assert attrs[2] == b"web_buckets\0"
        added += _elements_of(attrs[3])
    assert added == [(k, "host") for k in range(5000)]
    assert _elements_of(msgs[5][3][3]) == [(7, "other"), (8, "other")]
    assert msgs[6][3][2] == b"web_handover\0"
    assert _elements_of(msgs[6][3][3]) == [(7, "goto web_draining"), (8, "goto web_draining")]


def test_netlink_chunks_stay_below_the_nest_limit() -> None:
    data = "goto " + "g" * 32 + "_incoming"  # the longest chain name a group can have
    delta = Delta(removed={}, added={("m", data): tuple(range(10000))})
    batch, acks = encode_element_batch("multihost", delta, 0)
    msgs = _parse_batch(batch)[1:-1]
    assert len(msgs) == len(acks) > 1
    assert all(len(m[3][3]) + 4 <= 0xFFFF for m in msgs)
    keys = [k for m in msgs for k, d in _elements_of(m[3][3]) if d == data]
    assert keys == list(range(10000))
