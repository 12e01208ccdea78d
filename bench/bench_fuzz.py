"""Fuzz the heartbeat decoder: at least 1 M inputs through ``wire.decode``; report inputs/s.

Inputs, in equal thirds, from one seeded generator:

* random byte strings (length 0 .. MAX_SIZE + 64);
* mutated genuine heartbeats (random field values, encoded with the key) left unsigned:
  bit flips, byte overwrites, truncations, extensions — the MAC must reject them;
* the same mutations re-signed with the key (a buggy or hostile key holder), so the parser
  behind the MAC sees them: it must raise only :class:`WireError`, and any message it
  accepts must survive ``decode(encode(hb)) == hb``.  Accepts whose bytes differ from the
  canonical encoding (e.g. a group bitmap with trailing zero bytes) are counted and
  reported as ``non-canonical``: the format is malleable for key holders, harmless for
  others (the MAC covers the bytes).

Another exception or an unstable accept is a failure (exit status 1, with the offending
input in hex).  Pure CPU: no root, no network.

    .venv/bin/python bench/bench_fuzz.py --inputs 1000000 --seed 1
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter

from multihost.membership.wire import (
    MAC_SIZE,
    MAX_SIZE,
    SLOTS,
    Ack,
    Heartbeat,
    WireError,
    decode,
    encode,
    mac,
)

KEY = b"fuzz-key-0123456789abcdef0123456"


def genuine(rng: random.Random) -> Heartbeat:
    slots = rng.sample(range(SLOTS), rng.randrange(0, SLOTS + 1))
    return Heartbeat(
        cluster="c" * rng.randrange(1, 20),
        sender=f"n{rng.randrange(100)}",
        slot=rng.randrange(SLOTS),
        boot=rng.randbytes(8),
        seq=rng.randrange(1, 2**64),
        digest=rng.randbytes(rng.choice((0, 16, 32, 64))),
        view=rng.randrange(1 << SLOTS),
        applied_view=rng.randrange(1 << SLOTS),
        applied_epoch=rng.randrange(2**64),
        held_groups=rng.randrange(2 ** rng.choice((1, 8, 64, 512))),
        suspended_groups=rng.randrange(2 ** rng.choice((1, 8, 64))),
        draining=rng.random() < 0.5,
        acks={s: Ack(rng.randbytes(8), rng.randrange(2**64)) for s in slots},
    )


def mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        op = rng.randrange(5)
        if op == 0 and b:  # flip a bit
            i = rng.randrange(len(b) * 8)
            b[i // 8] ^= 1 << (i % 8)
        elif op == 1 and b:  # overwrite a byte (header bytes are the interesting ones)
            i = rng.randrange(min(len(b), 48)) if rng.random() < 0.7 else rng.randrange(len(b))
            b[i] = rng.choice((0, 1, 0x3F, 0x40, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2:  # truncate
            del b[rng.randrange(len(b) + 1) :]
        elif op == 3:  # extend
            b += rng.randbytes(rng.randrange(1, 40))
        elif b:  # delete a slice
            i = rng.randrange(len(b))
            del b[i : i + rng.randrange(1, 16)]
    if bytes(b) == data:  # a no-op draw (same byte, cut at the end): change something
        b.append(rng.randrange(256))
    return bytes(b)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--inputs", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    outcomes: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = {k: Counter() for k in ("random", "mutated", "resigned")}
    base = [encode(genuine(rng), KEY) for _ in range(256)]
    decode_s = 0.0
    started = time.perf_counter()
    for i in range(args.inputs):
        kind = ("random", "mutated", "resigned")[i % 3]
        if kind == "random":
            data = rng.randbytes(rng.randrange(MAX_SIZE + 65))
        else:
            data = mutate(rng.choice(base), rng)
            if kind == "resigned":
                body = data[:-MAC_SIZE] if len(data) > MAC_SIZE else data
                data = body + mac(KEY, body)
        t = time.perf_counter()
        outcome: str
        try:
            hb = decode(data, KEY)
        except WireError as e:
            decode_s += time.perf_counter() - t
            outcome = e.reason
        except Exception as e:  # the property under test: nothing else escapes
            print(f"FAIL: {type(e).__name__}: {e} for input {data.hex()}", file=sys.stderr)
            return 1
        else:
            decode_s += time.perf_counter() - t
            again = encode(hb, KEY)
            if decode(again, KEY) != hb:
                print(f"FAIL: unstable accept of {data.hex()}", file=sys.stderr)
                return 1
            outcome = "valid" if again == data else "valid-non-canonical"
        outcomes[outcome] += 1
        by_kind[kind][outcome] += 1
        if i % 250_000 == 0 and i:
            print(f"{i} inputs...", file=sys.stderr)
    wall = time.perf_counter() - started
    print(f"{args.inputs} inputs in {wall:.1f} s: {args.inputs / wall:,.0f} inputs/s including")
    print(f"generation; decode alone {args.inputs / decode_s:,.0f} inputs/s ({decode_s:.1f} s)")
    print("no exception other than WireError; every accepted input round-trips")
    for kind, c in by_kind.items():
        print(f"  {kind:9s} " + ", ".join(f"{k} {v}" for k, v in c.most_common()))
    print("  total     " + ", ".join(f"{k} {v}" for k, v in outcomes.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
