"""Heartbeat codec: round trips, every rejection reason, fuzzing, golden bytes."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multihost.membership.wire import (
    MAC_SIZE,
    MAX_DIGEST_BYTES,
    MAX_HELD_BYTES,
    MAX_NAME_BYTES,
    MAX_SIZE,
    MAX_U64,
    MIN_SIZE,
    WIRE_REASONS,
    Ack,
    Heartbeat,
    WireError,
    decode,
    encode,
    mac,
)

KEY = b"k" * 32

SAMPLE = Heartbeat(
    cluster="prod",
    sender="web-2",
    slot=2,
    boot=bytes.fromhex("0102030405060708"),
    seq=42,
    digest=bytes(range(32)),
    view=0b0111,
    applied_view=0b0111,
    applied_epoch=7,
    held_groups=0b101,
    suspended_groups=0b10,
    draining=True,
    acks={0: Ack(b"\xaa" * 8, 41), 1: Ack(b"\xbb" * 8, 40)},
)

# Layout v1 of SAMPLE under KEY; changing it is a wire-format change (bump VERSION).
GOLDEN = bytes.fromhex(
    "4d4868620101020707030101040520"
    "0102030405060708000000000000002a0000000000000007"
    "70726f64"
    "7765622d32"
    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
    "05"
    "02"
    "aaaaaaaaaaaaaaaa0000000000000029"
    "bbbbbbbbbbbbbbbb0000000000000028"
)


def sign(body: bytes, key: bytes = KEY) -> bytes:
    return body + mac(key, body)


def body_of(hb: Heartbeat) -> bytes:
    return encode(hb, KEY)[:-MAC_SIZE]


def reason(data: bytes, key: bytes = KEY) -> str:
    with pytest.raises(WireError) as info:
        decode(data, key)
    assert info.value.reason in WIRE_REASONS
    return info.value.reason


# ----------------------------------------------------------------- round trip


def test_golden_bytes() -> None:
    data = encode(SAMPLE, KEY)
    assert data[:-MAC_SIZE] == GOLDEN
    assert data[-MAC_SIZE:] == mac(KEY, GOLDEN)
    assert decode(data, KEY) == SAMPLE


def test_round_trip_minimal_and_unicode() -> None:
    hb = Heartbeat(cluster="c", sender="ñødé-ü", slot=7, boot=b"\0" * 8, seq=1, digest=b"")
    assert decode(encode(hb, KEY), KEY) == hb


def test_largest_message_fits() -> None:
    hb = Heartbeat(
        cluster="c" * MAX_NAME_BYTES,
        sender="s" * MAX_NAME_BYTES,
        slot=0,
        boot=b"b" * 8,
        seq=MAX_U64,
        digest=b"d" * MAX_DIGEST_BYTES,
        view=0xFF,
        applied_view=0xFF,
        applied_epoch=MAX_U64,
        held_groups=(1 << (8 * MAX_HELD_BYTES)) - 1,
        suspended_groups=(1 << (8 * MAX_HELD_BYTES)) - 1,
        acks={s: Ack(b"a" * 8, MAX_U64) for s in range(8)},
    )
    data = encode(hb, KEY)
    assert len(data) <= MAX_SIZE
    assert decode(data, KEY) == hb


names = st.text(min_size=1, max_size=20).filter(lambda s: len(s.encode()) <= MAX_NAME_BYTES)
u64 = st.integers(0, MAX_U64)
heartbeats = st.builds(
    Heartbeat,
    cluster=names,
    sender=names,
    slot=st.integers(0, 7),
    boot=st.binary(min_size=8, max_size=8),
    seq=u64,
    digest=st.binary(max_size=MAX_DIGEST_BYTES),
    view=st.integers(0, 255),
    applied_view=st.integers(0, 255),
    applied_epoch=u64,
    held_groups=st.integers(0, (1 << 512) - 1),
    suspended_groups=st.integers(0, (1 << 512) - 1),
    draining=st.booleans(),
    acks=st.dictionaries(st.integers(0, 7), st.builds(Ack, st.binary(min_size=8, max_size=8), u64)),
)


@given(heartbeats)
def test_round_trip(hb: Heartbeat) -> None:
    assert decode(encode(hb, KEY), KEY) == hb


@pytest.mark.parametrize(
    "change",
    [
        {"cluster": ""},
        {"sender": "x" * (MAX_NAME_BYTES + 1)},
        {"slot": 8},
        {"boot": b"short"},
        {"seq": -1},
        {"seq": MAX_U64 + 1},
        {"digest": b"d" * (MAX_DIGEST_BYTES + 1)},
        {"view": 256},
        {"held_groups": -1},
        {"suspended_groups": 1 << (8 * MAX_HELD_BYTES)},
        {"acks": {8: Ack(b"a" * 8, 1)}},
        {"acks": {0: Ack(b"a", 1)}},
    ],
)
def test_encode_refuses_unrepresentable_fields(change: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        encode(dataclasses.replace(SAMPLE, **change), KEY)  # type: ignore[arg-type]


# ------------------------------------------------------------------ rejection


def test_bad_mac_wrong_key() -> None:
    assert reason(encode(SAMPLE, KEY), b"another-key-entirely") == "bad-mac"


def test_bad_mac_tampered_tag() -> None:
    data = bytearray(encode(SAMPLE, KEY))
    data[-1] ^= 1
    assert reason(bytes(data)) == "bad-mac"


def test_truncated_short_input() -> None:
    assert reason(b"") == "truncated"
    assert reason(encode(SAMPLE, KEY)[: MIN_SIZE - 1]) == "truncated"


def test_truncated_body_shorter_than_its_lengths() -> None:
    assert reason(sign(body_of(SAMPLE)[:-1])) == "truncated"


def test_oversize() -> None:
    assert reason(b"\0" * (MAX_SIZE + 1)) == "oversize"


def test_bad_magic_is_checked_after_the_mac() -> None:
    body = bytearray(body_of(SAMPLE))
    body[0:4] = b"XXXX"
    assert reason(sign(bytes(body))) == "bad-magic"
    assert reason(bytes(body) + encode(SAMPLE, KEY)[-MAC_SIZE:]) == "bad-mac"


def test_wrong_version() -> None:
    body = bytearray(body_of(SAMPLE))
    body[4] = 2
    assert reason(sign(bytes(body))) == "wrong-version"


# Header offsets: 4 version, 5 flags, 6 slot, 10 held_len, 11 suspended_len, 12 cluster_len,
# 13 sender_len, 14 digest_len.
@pytest.mark.parametrize(
    ("offset", "value", "expected"),
    [
        (5, 0x80, "malformed"),  # unknown flag
        (6, 8, "malformed"),  # slot out of range
        (12, 0, "malformed"),  # empty cluster name
        (13, MAX_NAME_BYTES + 1, "malformed"),  # sender name too long
        (14, MAX_DIGEST_BYTES + 1, "malformed"),  # digest length
        (10, MAX_HELD_BYTES + 1, "malformed"),  # held bitmap length
        (11, 60, "truncated"),  # suspended bitmap longer than the datagram
    ],
)
def test_malformed_header_fields(offset: int, value: int, expected: str) -> None:
    body = bytearray(body_of(SAMPLE))
    body[offset] = value
    assert reason(sign(bytes(body))) == expected


def test_malformed_trailing_bytes_and_bad_utf8() -> None:
    assert reason(sign(body_of(SAMPLE) + b"\0")) == "malformed"
    hb = dataclasses.replace(SAMPLE, cluster="ab")
    body = bytearray(body_of(hb))
    header = struct.calcsize(">4sBBBBBBBBBBB8sQQ")
    body[header] = 0xFF  # first byte of the cluster name
    assert reason(sign(bytes(body))) == "malformed"


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(WireError) as info:
        decode("text", KEY)  # type: ignore[arg-type]
    assert info.value.reason == "malformed"


# -------------------------------------------------------------------- fuzzing


@settings(max_examples=400)
@given(st.binary(max_size=MAX_SIZE + 64))
def test_decode_arbitrary_bytes_raises_only_wire_errors(data: bytes) -> None:
    try:
        decode(data, KEY)
    except WireError as exc:
        assert exc.reason in WIRE_REASONS


@settings(max_examples=400)
@given(st.binary(max_size=MAX_SIZE - MAC_SIZE))
def test_decode_authenticated_garbage_raises_only_wire_errors(body: bytes) -> None:
    """Even with a valid MAC (a buggy or hostile key holder) the parser never crashes."""
    try:
        decode(sign(body), KEY)
    except WireError as exc:
        assert exc.reason in WIRE_REASONS


@settings(max_examples=300)
@given(heartbeats, st.data())
def test_any_flipped_bit_is_rejected_as_bad_mac(hb: Heartbeat, data: st.DataObject) -> None:
    raw = bytearray(encode(hb, KEY))
    bit = data.draw(st.integers(0, 8 * len(raw) - 1))
    raw[bit // 8] ^= 1 << (bit % 8)
    assert reason(bytes(raw)) == "bad-mac"


@settings(max_examples=200)
@given(heartbeats, st.data())
def test_truncating_a_valid_message_is_rejected(hb: Heartbeat, data: st.DataObject) -> None:
    raw = encode(hb, KEY)
    cut = data.draw(st.integers(0, len(raw) - 1))
    assert reason(raw[:cut]) in ("truncated", "bad-mac")


def test_handover_flag_round_trips_and_is_authenticated() -> None:
    hb = dataclasses.replace(SAMPLE, handover=True)
    raw = encode(hb, KEY)
    assert decode(raw, KEY).handover is True
    assert decode(encode(SAMPLE, KEY), KEY).handover is False
    flags_at = 5  # magic (4) + version (1)
    tampered = bytearray(raw)
    tampered[flags_at] ^= 0x02
    with pytest.raises(WireError) as err:
        decode(bytes(tampered), KEY)
    assert err.value.reason == "bad-mac"
