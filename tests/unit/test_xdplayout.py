"""The XDP program's shared layout: one declaration, a current header, stale objects refused."""

from __future__ import annotations

import hashlib
import itertools
import struct
from pathlib import Path

import pytest

from multihost.dataplane import xdpobject
from multihost.dataplane.xdplayout import (
    GROUP,
    IFACE,
    NODE,
    STATS,
    STRUCTS,
    Verdict,
    bucket_elements,
    group_bases,
    render_header,
)


def test_committed_header_is_generated_from_the_layout() -> None:
    assert xdpobject.HEADER.read_text() == render_header(), (
        "regenerate: python -m multihost.dataplane.xdplayout > "
        "src/multihost/dataplane/bpf/multihost_layout.h"
    )


def test_struct_sizes_are_what_the_c_asserts() -> None:
    header = render_header()
    for s in STRUCTS:
        assert f"sizeof(struct {s.name}) == {s.size}" in header
    assert GROUP.size == 28 and NODE.size == 48 and IFACE.size == 28
    assert STATS.size == 16 * len(Verdict) + 8
    assert struct.calcsize(NODE.fmt) == NODE.size


def test_group_tables_are_disjoint_and_8_aligned() -> None:
    sizes = [40320, 5, 17]
    bases = group_bases(sizes)
    spans = sorted((b, b + n) for (b0, b1), n in zip(bases, sizes, strict=True) for b in (b0, b1))
    assert all(a % 8 == 0 for a, _ in spans)
    assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans))
    assert bucket_elements(sizes) * 8 >= spans[-1][1]


def test_build_id_is_sha256_of_header_then_source() -> None:
    want = hashlib.sha256(xdpobject.HEADER.read_bytes() + xdpobject.SOURCE.read_bytes()).hexdigest()
    assert xdpobject.build_id() == want


def test_missing_and_stale_objects_are_refused(tmp_path: Path) -> None:
    missing = tmp_path / "none.o"
    with pytest.raises(xdpobject.XdpError, match="missing: build it with `make setup`"):
        xdpobject.check_object(missing)
    stale = tmp_path / "stale.o"
    stale.write_bytes(b"\x7fELF....MHBUILD:" + b"0" * 64 + b"\0")
    with pytest.raises(xdpobject.XdpError, match="stale"):
        xdpobject.check_object(stale)
    good = tmp_path / "good.o"
    good.write_bytes(b"\x7fELF....MHBUILD:" + xdpobject.build_id().encode() + b"\0")
    xdpobject.check_object(good)


def test_limits_name_the_key() -> None:
    from multihost.dataplane.xdplayout import MAX_ADDRS, MAX_GROUPS, limits_problem

    assert limits_problem(1, 40320, 1) is None
    assert limits_problem(MAX_GROUPS + 1, 40320, 1) == (
        "traffic_ip_group",
        f"{MAX_GROUPS + 1} groups: the XDP program takes at most {MAX_GROUPS}",
    )
    problem = limits_problem(1, 40320, MAX_ADDRS + 1)
    assert problem is not None and "traffic IPs" in problem[1]
    assert limits_problem(MAX_GROUPS, 40320, 1) is None  # the 8-slot table: every group fits
    assert limits_problem(46, 720720, 1) is None
    problem = limits_problem(47, 720720, 1)
    assert problem is not None and problem[0] == "traffic_ip_group"
    assert "at most 46 groups" in problem[1]
