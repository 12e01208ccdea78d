"""Exactly min-wise independent preference tables for up to 16 member slots.

Owns the shipped families (``src/multihost/tables/minwise-<n>.bin.xz``, written by
``scripts/build-minwise.py``): loading one with its sha256 checked against
``tables/manifest.json``, the exact min-wise check, and :class:`MinwiseTable`, a
:class:`~multihost.assignment.OrderingTable` over a family.

A family of ``M`` orderings of ``n`` slots is *exactly min-wise independent* when for every
nonempty set ``S`` of slots and every ``x`` in ``S``, ``x`` is the first slot of ``S`` in
exactly ``M / |S|`` orderings.  With first-live ownership that is exact balance for every
live set; only the failed member's buckets move on a failure (see ``docs/tables.md``).
The shipped families have the minimum size ``M = lcm(1..n)`` (840 for 8 slots, 720,720
for 16), distinct orderings, rows in lexicographic order.

Must not: do I/O other than reading its own package data, build families (that is the
script's job: no solver, no construction code at run time), or change the default table of
:mod:`multihost.assignment`.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import lzma
import math
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

import numpy as np
import numpy.typing as npt

from multihost.assignment import (
    AssignmentError,
    OrderingTable,
    OwnerArray,
    check_live,
    permutation_rows,
)

MIN_SLOTS = 1
MAX_SLOTS = 16  # a slot is one nibble in the data files
MAX_EXHAUSTIVE_SLOTS = 20  # the exhaustive check holds (n, 2**n) counts in memory
TABLES = "tables"
MANIFEST = "manifest.json"
FORMAT = "multihost-minwise-1"
#: Owner arrays a :class:`MinwiseTable` keeps (one byte per bucket): 256 live sets up to 12
#: slots, 46 of the 16-slot table (720,720 buckets).
CACHE_BYTES = 32 << 20

Orderings = npt.NDArray[np.int8]


class MinwiseError(AssignmentError):
    """A family that is missing, corrupt, or not exactly min-wise (names file or subset)."""


def lcm_upto(n: int) -> int:
    """``lcm(1, 2, ..., n)``: the minimum size of an exactly min-wise family on ``n``."""
    return math.lcm(*range(1, n + 1)) if n >= 1 else 1


def file_name(n: int) -> str:
    return f"minwise-{n}.bin.xz"


# ---------------------------------------------------------------------------------------
# Encoding: row-major, one nibble per slot, high nibble first, an odd row padded with 0.


def pack(orderings: Orderings) -> bytes:
    """The payload bytes of a family (``ceil(n/2)`` bytes per ordering)."""
    arr = np.asarray(orderings, dtype=np.uint8)
    rows, n = arr.shape
    if not 1 <= n <= MAX_SLOTS:
        raise MinwiseError(f"{n} slots do not fit the nibble format (1..{MAX_SLOTS})")
    if n % 2:
        arr = np.concatenate((arr, np.zeros((rows, 1), dtype=np.uint8)), axis=1)
    return (arr[:, 0::2] << 4 | arr[:, 1::2]).astype(np.uint8).tobytes()


def unpack(payload: bytes, n: int) -> Orderings:
    """Inverse of :func:`pack`; raises :class:`MinwiseError` on a length mismatch."""
    width = (n + 1) // 2
    if len(payload) % width:
        raise MinwiseError(f"payload of {len(payload)} bytes is not rows of {width} bytes")
    raw = np.frombuffer(payload, dtype=np.uint8).reshape(-1, width)
    out = np.empty((raw.shape[0], 2 * width), dtype=np.int8)
    out[:, 0::2] = raw >> 4
    out[:, 1::2] = raw & 0x0F
    return np.ascontiguousarray(out[:, :n])


def compress(payload: bytes) -> bytes:
    """The file bytes for a payload (xz, fixed settings: the build is byte-reproducible)."""
    return lzma.compress(payload, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9)


# ---------------------------------------------------------------------------------------
# Loading


def _root() -> Traversable:
    """The directory holding the data files (the package's ``tables/``)."""
    return resources.files("multihost").joinpath(TABLES)


def manifest() -> dict[str, Any]:
    """The parsed ``tables/manifest.json`` (``families``: one entry per slot count)."""
    ref = _root().joinpath(MANIFEST)
    try:
        data: dict[str, Any] = json.loads(ref.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MinwiseError(f"cannot read {TABLES}/{MANIFEST}: {exc}") from exc
    if data.get("format") != FORMAT:
        raise MinwiseError(f"{TABLES}/{MANIFEST}: format {data.get('format')!r}, want {FORMAT}")
    return data


def available() -> tuple[int, ...]:
    """Slot counts with a shipped family, ascending."""
    return tuple(sorted(int(k) for k in manifest()["families"]))


def decode(blob: bytes, entry: dict[str, Any], where: str) -> Orderings:
    """Check ``blob`` (the file bytes) against its manifest ``entry``; the orderings."""
    got = hashlib.sha256(blob).hexdigest()
    if got != entry["sha256"]:
        raise MinwiseError(f"{where}: sha256 {got} does not match the manifest {entry['sha256']}")
    try:
        payload = lzma.decompress(blob, format=lzma.FORMAT_XZ)
    except lzma.LZMAError as exc:
        raise MinwiseError(f"{where}: not a valid xz file: {exc}") from exc
    got = hashlib.sha256(payload).hexdigest()
    if got != entry["payload_sha256"]:
        raise MinwiseError(f"{where}: payload sha256 {got} does not match the manifest")
    arr = unpack(payload, int(entry["slots"]))
    if arr.shape[0] != entry["rows"]:
        raise MinwiseError(f"{where}: {arr.shape[0]} orderings, the manifest says {entry['rows']}")
    check_permutations(arr)
    return arr


@functools.cache
def family(n: int) -> Orderings:
    """The shipped family for ``n`` slots: a read-only ``(lcm(1..n), n)`` int8 array.

    The file's sha256 (and that of its decompressed payload) must match the manifest;
    otherwise :class:`MinwiseError` names the file.  The min-wise property itself is
    checked by :func:`verify` (the tests and the build run it on every shipped family).
    """
    if not MIN_SLOTS <= n <= MAX_SLOTS:
        raise MinwiseError(f"min-wise families exist for {MIN_SLOTS}..{MAX_SLOTS} slots, not {n}")
    entry = manifest()["families"].get(str(n))
    if entry is None:
        raise MinwiseError(f"no min-wise family for {n} slots is shipped ({TABLES}/{MANIFEST})")
    where = f"{TABLES}/{entry['file']}"
    try:
        blob = _root().joinpath(entry["file"]).read_bytes()
    except OSError as exc:
        raise MinwiseError(f"cannot read {where}: {exc}") from exc
    arr = decode(blob, entry, where)
    arr.setflags(write=False)
    return arr


# ---------------------------------------------------------------------------------------
# Verification


def check_permutations(orderings: Orderings) -> None:
    """Raise :class:`MinwiseError` unless ``orderings`` is a non-empty (M, n) permutation array."""
    arr = np.asarray(orderings)
    if arr.ndim != 2 or arr.shape[0] == 0 or not 1 <= arr.shape[1] <= MAX_EXHAUSTIVE_SLOTS:
        raise MinwiseError(
            f"want a non-empty (M, n<={MAX_EXHAUSTIVE_SLOTS}) array, got {arr.shape}"
        )
    n = arr.shape[1]
    bad = np.flatnonzero(~permutation_rows(arr))
    if bad.size:
        raise MinwiseError(f"row {int(bad[0])} is not a permutation of 0..{n - 1}")


def first_counts(orderings: Orderings) -> npt.NDArray[np.int64]:
    """``c[S, x]``: in how many orderings ``x`` is the first slot of the set ``S`` (a bitmask).

    For every one of the ``2**n`` sets at once, in ``O(M n + n**2 2**n)``: ``x`` is the first
    of ``S`` exactly when the set of slots ranked before ``x`` avoids ``S``.  So count, per
    ``x``, the orderings by that *prefix set* ``A`` (one ``bincount``), sum the counts over
    all ``A`` inside each mask (a subset-sum transform), and read ``c[S, x]`` at the
    complement of ``S``.  ``c[S, x] = 0`` for ``x`` not in ``S``.
    """
    check_permutations(orderings)
    arr = np.asarray(orderings, dtype=np.int64)
    rows, n = arr.shape
    full = (1 << n) - 1
    prefix = np.zeros(rows, dtype=np.int64)
    counts = np.zeros(n << n, dtype=np.int64)  # index x * 2**n + A
    for k in range(n):
        counts += np.bincount((arr[:, k] << n) | prefix, minlength=n << n)
        prefix |= 1 << arr[:, k]
    zeta = counts.reshape(n, 1 << n)
    for bit in range(n):  # zeta[x, Z] := sum of counts[x, A] over A subset of Z
        view = zeta.reshape(n, -1, 2, 1 << bit)
        view[:, :, 1, :] += view[:, :, 0, :]
    masks = np.arange(1 << n)
    out = zeta[:, full ^ masks].T.copy()  # out[S, x] = orderings whose prefix before x avoids S
    member = (masks[:, None] >> np.arange(n)) & 1
    out[member == 0] = 0
    return out


@dataclass(frozen=True)
class Report:
    """What :func:`verify` checked: ``subsets`` live sets of ``slots`` slots, ``rows`` orderings."""

    slots: int
    rows: int
    subsets: int
    exhaustive: bool


def verify(
    orderings: Orderings, *, mode: str = "exhaustive", samples: int = 200, seed: int = 0
) -> Report:
    """Check that ``orderings`` is exactly min-wise; raise :class:`MinwiseError` otherwise.

    ``mode="exhaustive"`` (the default, any ``n <= 20``; ~0.5 s for 720,720 orderings of 16
    slots): every nonempty set, via :func:`first_counts`.  ``mode="sampled"``: an independent
    direct computation (first slot of ``S`` in every row, one set at a time) for every set of
    size ``>= n - 3`` and ``samples`` random sets, seeded.  The error names the set, the
    slot, the count and the expected count.
    """
    check_permutations(orderings)
    arr = np.asarray(orderings, dtype=np.int8)
    rows, n = arr.shape
    need = lcm_upto(n)
    if rows % need:
        raise MinwiseError(
            f"{rows} orderings: exact min-wise on {n} slots needs a multiple of {need}"
        )
    if mode == "exhaustive":
        counts = first_counts(arr)
        sizes = np.array([m.bit_count() for m in range(1 << n)], dtype=np.int64)
        expected = np.where(sizes > 0, rows // np.maximum(sizes, 1), 0)
        member = ((np.arange(1 << n)[:, None] >> np.arange(n)) & 1).astype(bool)
        want = np.where(member, expected[:, None], 0)
        wrong = np.argwhere(counts != want)
        if wrong.size:
            mask, x = (int(v) for v in wrong[0])
            _fail(mask, x, int(counts[mask, x]), int(want[mask, x]), n)
        return Report(n, rows, (1 << n) - 1, True)
    if mode != "sampled":
        raise MinwiseError(f"unknown verify mode {mode!r} (exhaustive, sampled)")
    # Sets of size >= n - 3 have their first slot among each row's first 4: evaluate those on
    # the distinct 4-prefixes, weighted by how many rows share each (same counts, less work).
    depth = min(4, n)
    shifts = 4 * np.arange(depth - 1, -1, -1)
    codes, weight = np.unique(
        (arr[:, :depth].astype(np.int64) << shifts).sum(axis=1), return_counts=True
    )
    heads = ((codes[:, None] >> shifts) & 0x0F).astype(np.int8)
    big, rand = _sample_masks(n, samples, seed)
    checked = 0
    for mask, on_heads in [(m, True) for m in big] + [(m, False) for m in rand]:
        if on_heads:
            got = np.bincount(first_of(heads, mask, n), weights=weight, minlength=n)
        else:
            got = np.bincount(first_of(arr, mask, n), minlength=n)
        size = mask.bit_count()
        for x in range(n):
            want_x = rows // size if mask >> x & 1 else 0
            if got[x] != want_x:
                _fail(mask, x, int(got[x]), want_x, n)
        checked += 1
    return Report(n, rows, checked, False)


def first_of(orderings: Orderings, mask: int, slots: int) -> npt.NDArray[np.int64]:
    """The first slot of the set ``mask`` in each (possibly truncated) ordering, directly.

    Raises :class:`MinwiseError` when a row holds no slot of ``mask``.
    """
    arr = np.asarray(orderings)
    live = ((mask >> np.arange(slots)) & 1).astype(bool)
    hit = live[arr]  # (rows, width): is the slot at each rank in the set
    if not hit.any(axis=1).all():
        raise MinwiseError(f"set {mask:#x} has no slot in some row")
    first: npt.NDArray[np.int64] = arr[np.arange(arr.shape[0]), np.argmax(hit, axis=1)].astype(
        np.int64
    )
    return first


def _sample_masks(n: int, samples: int, seed: int) -> tuple[list[int], list[int]]:
    """Every set of size >= n - 3 (ascending), and ``samples`` random nonempty sets."""
    full = (1 << n) - 1
    big = {full}
    for r in range(1, min(3, n - 1) + 1):
        big.update(full ^ combo for combo in _combinations(n, r))
    rng = np.random.default_rng(seed)
    rand = rng.integers(1, full + 1, size=samples, dtype=np.int64).tolist() if samples else []
    return sorted(big), [int(m) for m in rand]


def _combinations(n: int, r: int) -> list[int]:
    return [sum(1 << i for i in c) for c in itertools.combinations(range(n), r)]


def _fail(mask: int, x: int, got: int, want: int, n: int) -> None:
    members = [i for i in range(n) if mask >> i & 1]
    raise MinwiseError(
        f"not exactly min-wise: slot {x} is first of {members} in {got} orderings, want {want}"
    )


# ---------------------------------------------------------------------------------------
# The assignment adapter


class MinwiseTable(OrderingTable):
    """An :class:`OrderingTable` over :func:`family` ``(slots)``, with a bounded owner cache.

    ``OrderingTable`` caches one owner array per live set without bound, which is fine for 8
    slots (255 sets x 40 KB) but not for 16 (65,535 sets x 720 KB); this keeps the
    ``cache_size`` most recent (default: 256, within :data:`CACHE_BYTES`).  Ownership
    semantics are those of ``OrderingTable``.
    """

    def __init__(self, slots: int, *, cache_size: int | None = None) -> None:
        super().__init__(family(slots), name=f"minwise-{slots}")
        if cache_size is None:  # 256 live sets, at most CACHE_BYTES of owner arrays
            cache_size = max(16, min(256, CACHE_BYTES // self.buckets))
        self._bounded = functools.lru_cache(maxsize=cache_size)(self._compute_owners)

    def owners(self, live: frozenset[int]) -> OwnerArray:
        check_live(live, self.slots)
        result: OwnerArray = self._bounded(frozenset(live))
        return result


@functools.cache
def minwise_table(slots: int) -> MinwiseTable:
    """The shared :class:`MinwiseTable` for ``slots`` slots (one instance per count)."""
    return MinwiseTable(slots)
