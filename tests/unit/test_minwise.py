"""The shipped exactly min-wise families: sizes, exact balance, failure/recovery, integrity.

n <= 12: every live set and every single-member failure/recovery, by a direct first-live
computation that shares no code with ``minwise.verify``.  n = 13..16: ``verify`` over every
subset (counting identity), the independent direct check on every set of size >= n - 3
plus random sets, and sampled failures through the ``assignment`` adapter.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import lzma
import math
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from multihost import minwise
from multihost.assignment import (
    AssignmentError,
    OrderingTable,
    Transfer,
    assign,
    default_table,
    transfers,
)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build-minwise.py"
SMALL = range(1, 13)
LARGE = range(13, 17)
SIZES = {8: 840, 9: 2520, 10: 2520, 11: 27720, 12: 27720, 13: 360360, 16: 720720}

Owners = dict[int, npt.NDArray[np.int8]]


def levels(fam: npt.NDArray[np.int8]) -> Iterator[Owners]:
    """Owner arrays of every live set, one level (set size) at a time, from the definition.

    The owner of ``S`` is ``S``'s first slot in each ordering: that of ``S`` minus its top
    slot ``t``, unless ``t`` is ranked earlier.  Only two levels are held at once.
    """
    rows, n = fam.shape
    rank = np.empty_like(fam)
    rank[np.arange(rows)[:, None], fam] = np.arange(n, dtype=np.int8)
    every = np.arange(rows)
    level: Owners = {1 << s: np.full(rows, s, dtype=np.int8) for s in range(n)}
    yield level
    for k in range(2, n + 1):
        nxt: Owners = {}
        for combo in itertools.combinations(range(n), k):
            mask = sum(1 << s for s in combo)
            top = combo[-1]
            parent = level[mask ^ (1 << top)]
            nxt[mask] = np.where(rank[:, top] < rank[every, parent], np.int8(top), parent)
        yield nxt
        level = nxt


def members(mask: int) -> list[int]:
    return [s for s in range(mask.bit_length()) if mask >> s & 1]


@pytest.mark.parametrize("n", SMALL)
def test_small_families_exhaustively(n: int) -> None:
    fam = minwise.family(n)
    rows = fam.shape[0]
    assert rows == math.lcm(*range(1, n + 1))
    seen_sets = seen_failures = 0
    previous: Owners = {}
    for level in levels(fam):
        for mask, owner in level.items():
            live = members(mask)
            k = len(live)
            counts = np.bincount(owner, minlength=n)
            want = np.zeros(n, dtype=np.int64)
            want[live] = rows // k
            assert np.array_equal(counts, want), (live, counts.tolist())
            seen_sets += 1
            if k == 1:
                continue
            # Failure of each member s: the sets S - s, stacked (k, rows).
            after = np.stack([previous[mask ^ (1 << s)] for s in live])
            moved = after != owner[None, :]
            owned = owner[None, :] == np.array(live, dtype=np.int8)[:, None]
            # Exactly s's buckets move (and recovery, S - s -> S, moves exactly them back).
            assert np.array_equal(moved, owned), live
            # ... and each survivor takes (on recovery: gives back) the same number.
            dest = np.bincount((np.arange(k)[:, None] * n + after)[owned], minlength=k * n).reshape(
                k, n
            )
            share = np.zeros((k, n), dtype=np.int64)
            share[:, live] = rows // (k * (k - 1))
            share[np.arange(k), live] = 0
            assert np.array_equal(dest, share), live
            seen_failures += k
        previous = level
    assert seen_sets == 2**n - 1
    assert seen_failures == n * 2 ** (n - 1) - n


@pytest.mark.parametrize("n", range(1, 17))
def test_every_shipped_family_is_exactly_minwise(n: int) -> None:
    fam = minwise.family(n)
    report = minwise.verify(fam)
    assert report == minwise.Report(n, math.lcm(*range(1, n + 1)), 2**n - 1, True)
    assert fam.dtype == np.int8
    assert not fam.flags.writeable
    assert SIZES.get(n, fam.shape[0]) == fam.shape[0]


@pytest.mark.parametrize("n", LARGE)
def test_large_families_directly(n: int) -> None:
    fam = minwise.family(n)
    report = minwise.verify(fam, mode="sampled", samples=30, seed=n)
    big = sum(math.comb(n, r) for r in range(4))
    assert report.subsets == big + 30
    assert not report.exhaustive


@pytest.mark.parametrize("n", range(1, 17))
def test_orderings_distinct_sorted_and_contiguous_when_all_live(n: int) -> None:
    fam = minwise.family(n).astype(np.int64)
    codes = (fam << (4 * np.arange(n - 1, -1, -1))).sum(axis=1)
    assert np.all(np.diff(codes) > 0)  # strictly increasing: distinct, lexicographic
    per = fam.shape[0] // n
    assert np.array_equal(fam[:, 0], np.repeat(np.arange(n), per))


@pytest.mark.parametrize("n", LARGE)
def test_large_failures_through_the_adapter(n: int) -> None:
    table = minwise.minwise_table(n)
    rows = table.buckets
    rng = np.random.default_rng(1000 + n)
    lives = [frozenset(range(n)), frozenset(range(n)) - {0, n - 1}]
    lives += [frozenset(np.flatnonzero(rng.random(n) < 0.5).tolist()) | {1, 2} for _ in range(2)]
    for live in lives:
        before = assign(live, table)
        for s in rng.choice(sorted(live), size=2, replace=False).tolist():
            after = assign(live - {s}, table)
            changed = before.owners != after.owners
            assert np.array_equal(changed, before.owners == s)
            per = rows // (len(live) * (len(live) - 1))
            assert transfers(before, after) == sorted(Transfer(s, t, per) for t in live - {s})
            assert transfers(after, before) == sorted(Transfer(t, s, per) for t in live - {s})


def test_adapter_with_assignment_all_sets_of_8() -> None:
    table = minwise.minwise_table(8)
    assert isinstance(table, OrderingTable)
    assert minwise.minwise_table(8) is table
    assert (table.name, table.buckets, table.slots) == ("minwise-8", 840, 8)
    worst = dict.fromkeys(range(1, 9), 0)
    for r in range(1, 9):
        for live in itertools.combinations(range(8), r):
            a = assign(live, table)
            assert {a.count(s) for s in live} == {840 // r}
            assert sum(a.count(s) for s in range(8)) == 840
            worst[r] = max(worst[r], *(len(a.ranges(s)) for s in live))
    # docs/tables.md: fragmentation (worst ranges of one member) by number live
    assert worst == {1: 1, 2: 108, 3: 60, 4: 26, 5: 10, 6: 4, 7: 2, 8: 1}
    assert assign(range(8), table).ranges(3) == ((315, 419),)
    # The default table is untouched.
    assert default_table().buckets == 40320
    assert assign({0, 1}).table is default_table()


def test_adapter_cache_is_bounded() -> None:
    table = minwise.MinwiseTable(6, cache_size=2)
    first = table.owners(frozenset({0, 1}))
    assert table.owners(frozenset({1, 0})) is first
    table.owners(frozenset({2}))
    table.owners(frozenset({3}))
    assert table._bounded.cache_info().currsize == 2
    with pytest.raises(AssignmentError, match="slot 6"):
        table.owners(frozenset({6}))


def test_first_counts_match_brute_force() -> None:
    rng = np.random.default_rng(7)
    for n in (1, 2, 3, 5, 6):
        fam = np.array([rng.permutation(n) for _ in range(50)], dtype=np.int8)
        counts = minwise.first_counts(fam)
        assert counts.shape == (2**n, n)
        assert counts[0].sum() == 0
        for mask in range(1, 2**n):
            live = members(mask)
            brute = [0] * n
            for row in fam.tolist():
                brute[next(x for x in row if x in live)] += 1
            assert counts[mask].tolist() == brute, (n, live)


def test_verify_rejects_what_is_not_exactly_minwise() -> None:
    cyclic = np.array([np.roll(np.arange(4), -i) for i in range(4)] * 3, dtype=np.int8)
    with pytest.raises(minwise.MinwiseError, match=r"slot 0 is first of \[0, 1\] in 9 "):
        minwise.verify(cyclic)
    with pytest.raises(minwise.MinwiseError, match=r"first of \[0, 1\]"):
        minwise.verify(cyclic, mode="sampled", samples=0)
    with pytest.raises(minwise.MinwiseError, match="multiple of 12"):
        minwise.verify(cyclic[:4])
    bad = minwise.family(8).copy()
    bad[100, [3, 4]] = bad[100, [4, 3]]  # one swap in one row breaks exactness
    with pytest.raises(minwise.MinwiseError, match="not exactly min-wise"):
        minwise.verify(bad)
    bad[5, 0] = bad[5, 1]
    with pytest.raises(minwise.MinwiseError, match="row 5 is not a permutation"):
        minwise.verify(bad)
    with pytest.raises(minwise.MinwiseError, match="unknown verify mode"):
        minwise.verify(minwise.family(3), mode="fast")
    # All 4! orderings: exactly min-wise at twice the minimum size.
    every = np.array(list(itertools.permutations(range(4))), dtype=np.int8)
    assert minwise.verify(every).subsets == 15


def test_pack_round_trip() -> None:
    for n in (1, 7, 16):
        fam = minwise.family(n)
        payload = minwise.pack(fam)
        assert len(payload) == fam.shape[0] * ((n + 1) // 2)
        assert np.array_equal(minwise.unpack(payload, n), fam)


def _tampered_root(tmp_path: Path, n: int, change: str) -> Path:
    shutil.copytree(ROOT / "src" / "multihost" / "tables", tmp_path / "tables")
    target = tmp_path / "tables" / minwise.file_name(n)
    blob = bytearray(target.read_bytes())
    if change == "flip":
        blob[len(blob) // 2] ^= 0x01
        target.write_bytes(bytes(blob))
    else:  # a valid xz file with other orderings, its file checksum "fixed" in the manifest
        fam = minwise.family(n).copy()
        fam[0, [0, 1]] = fam[0, [1, 0]]
        new = minwise.compress(minwise.pack(fam))
        target.write_bytes(new)
        path = tmp_path / "tables" / minwise.MANIFEST
        doc = json.loads(path.read_text(encoding="utf-8"))
        doc["families"][str(n)]["sha256"] = hashlib.sha256(new).hexdigest()
        path.write_text(json.dumps(doc), encoding="utf-8")
    return tmp_path / "tables"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("flip", r"tables/minwise-9\.bin\.xz: sha256 [0-9a-f]{64} does not match"),
        ("payload", r"tables/minwise-9\.bin\.xz: payload sha256 .* does not match"),
    ],
)
def test_tampered_file_is_refused_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str, message: str
) -> None:
    root = _tampered_root(tmp_path, 9, change)
    minwise.family(9)  # cached before: the tampered copy must be read afresh
    minwise.family.cache_clear()
    monkeypatch.setattr(minwise, "_root", lambda: root)
    try:
        with pytest.raises(minwise.MinwiseError, match=message):
            minwise.family(9)
        assert minwise.family(8).shape == (840, 8)  # the other files still load
    finally:
        minwise.family.cache_clear()


def test_missing_and_unsupported_families(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for n in (0, 17):
        with pytest.raises(minwise.MinwiseError, match=f"1..16 slots, not {n}"):
            minwise.family(n)
    assert minwise.available() == tuple(range(1, 17))
    (tmp_path / minwise.MANIFEST).write_text(
        json.dumps({"format": minwise.FORMAT, "families": {}}), encoding="utf-8"
    )
    minwise.family.cache_clear()
    monkeypatch.setattr(minwise, "_root", lambda: tmp_path)
    try:
        with pytest.raises(minwise.MinwiseError, match="no min-wise family for 5 slots"):
            minwise.family(5)
        (tmp_path / minwise.MANIFEST).write_text("{}", encoding="utf-8")
        with pytest.raises(minwise.MinwiseError, match="format None"):
            minwise.manifest()
    finally:
        minwise.family.cache_clear()


def test_build_is_deterministic_and_matches_the_shipped_files(tmp_path: Path) -> None:
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        subprocess.run(
            [sys.executable, str(SCRIPT), "--max", "10", "--out", str(out)],
            check=True,
            capture_output=True,
            timeout=120,
        )
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == sorted([minwise.MANIFEST] + [minwise.file_name(n) for n in range(1, 11)])
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    built = json.loads((outs[0] / minwise.MANIFEST).read_text(encoding="utf-8"))["families"]
    shipped = minwise.manifest()["families"]
    for n in range(1, 11):
        # The same orderings as shipped (the xz bytes could differ with another liblzma).
        assert built[str(n)]["payload_sha256"] == shipped[str(n)]["payload_sha256"]
        payload = lzma.decompress((outs[0] / minwise.file_name(n)).read_bytes())
        assert np.array_equal(minwise.unpack(payload, n), minwise.family(n))
    check = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--max", "10"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stdout
    assert check.stdout.count(" ok") == 10
