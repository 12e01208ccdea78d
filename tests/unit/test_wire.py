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
    SLOTS,
    VERSION,
    WIRE_REASONS,
    Ack,
    Heartbeat,
    WireError,
    decode,
    decode_v1,
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

# Layout v2 of SAMPLE under KEY; changing it is a wire-format change (bump VERSION).
GOLDEN = bytes.fromhex(
    "4d486862"
    "02"
    "01"
    "02"
    "01"
    "01"
    "04"
    "05"
    "20"  # magic version flags slot lengths
    "0007"
    "0007"
    "0003"  # view, applied_view, ack_mask: 16 bits each
    "0102030405060708000000000000002a0000000000000007"
    "70726f64"
    "7765622d32"
    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
    "05"
    "02"
    "aaaaaaaaaaaaaaaa0000000000000029"
    "bbbbbbbbbbbbbbbb0000000000000028"
)

# Version 1 (8-bit masks) of SAMPLE under KEY: what a node of the previous release sends.
# It must keep being recognised (and refused, naming its sender).
GOLDEN_V1 = bytes.fromhex(
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


# Slots beyond 8: slot 13, view and applied view with bit 15, acks of slots 9 and 15.
SAMPLE16 = dataclasses.replace(
    SAMPLE,
    slot=13,
    view=0b1010_0000_0000_0011,
    applied_view=0b1000_0000_0000_0001,
    acks={9: Ack(b"\xcc" * 8, 5), 15: Ack(b"\xdd" * 8, 6)},
)
GOLDEN16 = bytes.fromhex(
    "4d486862"
    "02"
    "01"
    "0d"
    "01"
    "01"
    "04"
    "05"
    "20"
    "a003"
    "8001"
    "8200"
    "0102030405060708000000000000002a0000000000000007"
    "70726f64"
    "7765622d32"
    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
    "05"
    "02"
    "cccccccccccccccc0000000000000005"
    "dddddddddddddddd0000000000000006"
)


def test_golden_bytes_sixteen_slots() -> None:
    data = encode(SAMPLE16, KEY)
    assert data[:-MAC_SIZE] == GOLDEN16
    assert decode(data, KEY) == SAMPLE16


def test_version_one_is_recognised_and_refused_naming_the_sender() -> None:
    assert VERSION == 2 and SLOTS == 16
    datagram = sign(GOLDEN_V1)
    assert decode_v1(datagram, KEY) == SAMPLE  # the old layout, byte for byte
    with pytest.raises(WireError) as info:
        decode(datagram, KEY)
    assert info.value.reason == "old-version"
    assert info.value.sender == "web-2"
    assert "version 1" in info.value.detail and "version 2" in info.value.detail
    # Only authenticated: with another key it is bad-mac like any forgery.
    assert reason(datagram, b"another-key-entirely") == "bad-mac"
    # A version-1 body that is malformed is still refused (malformed), never accepted.
    assert reason(sign(GOLDEN_V1 + b"\0")) == "malformed"


def test_version_one_decoder_refuses_version_two() -> None:
    with pytest.raises(WireError) as info:
        decode_v1(encode(SAMPLE, KEY), KEY)
    assert info.value.reason == "wrong-version"


def test_round_trip_minimal_and_unicode() -> None:
    hb = Heartbeat(cluster="c", sender="ñødé-ü", slot=15, boot=b"\0" * 8, seq=1, digest=b"")
    assert decode(encode(hb, KEY), KEY) == hb


def test_largest_message_fits() -> None:
    hb = Heartbeat(
        cluster="c" * MAX_NAME_BYTES,
        sender="s" * MAX_NAME_BYTES,
        slot=0,
        boot=b"b" * 8,
        seq=MAX_U64,
        digest=b"d" * MAX_DIGEST_BYTES,
        view=0xFFFF,
        applied_view=0xFFFF,
        applied_epoch=MAX_U64,
        held_groups=(1 << (8 * MAX_HELD_BYTES)) - 1,
        suspended_groups=(1 << (8 * MAX_HELD_BYTES)) - 1,
        acks={s: Ack(b"a" * 8, MAX_U64) for s in range(SLOTS)},
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
    slot=st.integers(0, SLOTS - 1),
    boot=st.binary(min_size=8, max_size=8),
    seq=u64,
    digest=st.binary(max_size=MAX_DIGEST_BYTES),
    view=st.integers(0, 0xFFFF),
    applied_view=st.integers(0, 0xFFFF),
    applied_epoch=u64,
    held_groups=st.integers(0, (1 << 512) - 1),
    suspended_groups=st.integers(0, (1 << 512) - 1),
    draining=st.booleans(),
    acks=st.dictionaries(
        st.integers(0, SLOTS - 1), st.builds(Ack, st.binary(min_size=8, max_size=8), u64)
    ),
)


@given(heartbeats)
def test_round_trip(hb: Heartbeat) -> None:
    assert decode(encode(hb, KEY), KEY) == hb


@pytest.mark.parametrize(
    "change",
    [
        {"cluster": ""},
        {"sender": "x" * (MAX_NAME_BYTES + 1)},
        {"slot": 16},
        {"boot": b"short"},
        {"seq": -1},
        {"seq": MAX_U64 + 1},
        {"digest": b"d" * (MAX_DIGEST_BYTES + 1)},
        {"view": 1 << 16},
        {"applied_view": 1 << 16},
        {"held_groups": -1},
        {"suspended_groups": 1 << (8 * MAX_HELD_BYTES)},
        {"acks": {16: Ack(b"a" * 8, 1)}},
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


@pytest.mark.parametrize("version", [0, 3, 9, 255])
def test_wrong_version(version: int) -> None:
    body = bytearray(body_of(SAMPLE))
    body[4] = version
    assert reason(sign(bytes(body))) == "wrong-version"


def test_a_version_two_body_labelled_version_one_is_refused() -> None:
    body = bytearray(body_of(SAMPLE))
    body[4] = 1  # parsed with the old layout: lengths disagree, still never accepted
    assert reason(sign(bytes(body))) in ("malformed", "truncated", "old-version")


# Header offsets (v2): 4 version, 5 flags, 6 slot, 7 held_len, 8 suspended_len,
# 9 cluster_len, 10 sender_len, 11 digest_len, 12 view, 14 applied_view, 16 ack_mask.
@pytest.mark.parametrize(
    ("offset", "value", "expected"),
    [
        (5, 0x80, "malformed"),  # unknown flag
        (6, 16, "malformed"),  # slot out of range
        (9, 0, "malformed"),  # empty cluster name
        (10, MAX_NAME_BYTES + 1, "malformed"),  # sender name too long
        (11, MAX_DIGEST_BYTES + 1, "malformed"),  # digest length
        (7, MAX_HELD_BYTES + 1, "malformed"),  # held bitmap length
        (8, 60, "truncated"),  # suspended bitmap longer than the datagram
        (16, 0xFF, "truncated"),  # ack mask bits 8..15 all set: 8 more acks needed
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
    header = struct.calcsize(">4sBBBBBBBBHHH8sQQ")
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
