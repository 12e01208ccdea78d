#!/usr/bin/env python3
"""Build the exactly min-wise families shipped in src/multihost/tables/ (see docs/tables.md).

  scripts/build-minwise.py                 build n = 1..16 into src/multihost/tables/
  scripts/build-minwise.py --max 12        only n = 1..12 (the manifest keeps other entries)
  scripts/build-minwise.py --out DIR       write elsewhere (the tests rebuild into a tmpdir)
  scripts/build-minwise.py --check         rebuild in memory, compare with the shipped files
                                           (exit 1 when an ordering differs)

Construction (no solver): an ordering of n slots is a maximal chain
0 = A_0 < A_1 < ... < A_n = [n] of the subset lattice, and the family is exactly min-wise
iff every lattice edge A -> A+{x} with |A| = k lies on exactly f_k = M / (n * C(n-1, k))
of its orderings.  That uniform edge load is an integer flow of value M = lcm(1..n) from
the empty set to [n], and any integer flow in a DAG splits into M unit paths.  The split
here: walk all M paths one level at a time; at a node A the paths arriving there, in path
order, take the n - k missing slots round-robin (ascending), so each edge gets exactly
f_k paths.  Finally the rows are sorted lexicographically.  Deterministic, ~15 s for all n.

Each family is checked (multihost.minwise.verify, every subset) before it is written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from multihost import minwise

ROOT = Path(__file__).resolve().parent.parent
TABLES = ROOT / "src" / "multihost" / "tables"


def construct(n: int) -> np.ndarray:
    """The family for ``n`` slots: ``(lcm(1..n), n)`` int8, rows sorted lexicographically."""
    total = minwise.lcm_upto(n)
    prefix = np.zeros(total, dtype=np.int64)  # the node (slot set) each path is at
    out = np.empty((total, n), dtype=np.int8)
    ids = np.arange(total)
    slots = np.arange(n)
    for k in range(n):
        load = total // (n * math.comb(n - 1, k))  # f_k: paths per edge at this level
        assert load * n * math.comb(n - 1, k) == total
        order = np.lexsort((ids, prefix))  # group the paths by node, in path order
        grouped = prefix[order]
        starts = np.r_[0, np.flatnonzero(np.diff(grouped)) + 1]
        first = np.repeat(starts, np.diff(np.r_[starts, total]))
        rank = np.empty(total, dtype=np.int64)
        rank[order] = np.arange(total) - first  # position among the paths at the same node
        choice = rank % (n - k)  # round-robin over the node's missing slots
        missing = ((prefix[:, None] >> slots) & 1) == 0
        nth = np.cumsum(missing, axis=1) - 1
        pick = np.argmax(missing & (nth == choice[:, None]), axis=1)
        # each edge out of each node gets `load` paths: the node's in-flow is (n - k) * load
        out[:, k] = pick
        prefix |= 1 << pick
    return out[np.lexsort(out.T[::-1])]


def build(n: int) -> tuple[bytes, dict[str, object]]:
    """The file bytes and manifest entry for ``n`` slots (verified exhaustively)."""
    fam = construct(n)
    minwise.verify(fam)
    if n > 1 and np.any(np.all(fam[1:] == fam[:-1], axis=1)):
        raise SystemExit(f"n={n}: duplicate orderings")  # the construction gives none
    payload = minwise.pack(fam)
    blob = minwise.compress(payload)
    entry: dict[str, object] = {
        "slots": n,
        "rows": int(fam.shape[0]),
        "file": minwise.file_name(n),
        "bytes": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    return blob, entry


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--min", type=int, default=minwise.MIN_SLOTS)
    parser.add_argument("--max", type=int, default=minwise.MAX_SLOTS)
    parser.add_argument("--out", type=Path, default=TABLES)
    parser.add_argument("--check", action="store_true", help="compare with --out, write nothing")
    args = parser.parse_args(argv)
    if not minwise.MIN_SLOTS <= args.min <= args.max <= minwise.MAX_SLOTS:
        parser.error(f"need {minwise.MIN_SLOTS} <= --min <= --max <= {minwise.MAX_SLOTS}")
    out: Path = args.out
    path = out / minwise.MANIFEST
    old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    families: dict[str, Any] = dict(old.get("families", {}))
    stale = 0
    for n in range(args.min, args.max + 1):
        started = time.monotonic()
        blob, entry = build(n)
        took = time.monotonic() - started
        target = out / minwise.file_name(n)
        if args.check:  # same orderings; the xz bytes may differ with another liblzma
            shipped = families.get(str(n), {})
            same = all(shipped.get(k) == entry[k] for k in ("slots", "rows", "payload_sha256"))
            identical = target.exists() and target.read_bytes() == blob
            stale += not same
            state = "ok" if same else "STALE"
            print(f"n={n:2} {state}{'' if identical else ' (file bytes differ)'}", flush=True)
            continue
        out.mkdir(parents=True, exist_ok=True)
        target.write_bytes(blob)
        families[str(n)] = entry
        print(f"n={n:2} M={entry['rows']:>7} {entry['bytes']:>8} B  {took:5.2f} s", flush=True)
    if args.check:
        return 1 if stale else 0
    doc = {
        "format": minwise.FORMAT,
        "encoding": "xz of row-major orderings, one nibble per slot, high nibble first, "
        "odd rows padded with 0; sha256 of the file and of the decompressed payload",
        "families": {k: families[k] for k in sorted(families, key=int)},
    }
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
