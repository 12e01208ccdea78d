"""Decoding of the nf_tables counter dump (multihost.dataplane.nfcounters), on built bytes."""

from __future__ import annotations

import struct

import pytest

from multihost.dataplane import nfcounters as nc


def _msg(kind: int, body: bytes) -> bytes:
    return nc.NLMSG.pack(nc.NLMSG.size + len(body), kind, 2, 1, 0) + body


def _obj(name: str, packets: int, nbytes: int) -> bytes:
    data = nc.attr(nc._COUNTER_BYTES, nbytes.to_bytes(8, "big"))
    data += nc.attr(nc._COUNTER_PACKETS, packets.to_bytes(8, "big"))
    body = struct.pack("=BBH", nc.NFPROTO_INET, 0, 0)
    body += nc.attr(nc._OBJ_TABLE, b"multihost\0") + nc.attr(nc._OBJ_NAME, name.encode() + b"\0")
    body += nc.attr(nc._OBJ_DATA | 0x8000, data)
    return _msg((nc.NFNL_SUBSYS_NFTABLES << 8) | nc.NFT_MSG_NEWOBJ, body)


def test_decode_counters_until_done() -> None:
    out: dict[str, tuple[int, int]] = {}
    assert not nc.decode_replies(_obj("web_accepted", 7, 420), out)
    assert nc.decode_replies(_obj("web_dropped", 2**40, 3) + _msg(nc.NLMSG_DONE, bytes(4)), out)
    assert out == {"web_accepted": (7, 420), "web_dropped": (2**40, 3)}


def test_error_reply_raises() -> None:
    with pytest.raises(nc.CounterError, match="counter dump refused"):
        nc.decode_replies(_msg(nc.NLMSG_ERROR, struct.pack("=i", -1) + bytes(16)), {})


def test_request_asks_for_counter_objects_of_one_table() -> None:
    req = nc.encode_request("multihost", 9)
    size, kind, flags, seq, _ = nc.NLMSG.unpack_from(req)
    assert (size, kind, flags, seq) == (len(req), (10 << 8) | 19, 0x301, 9)
    assert b"multihost\0" in req and struct.pack(">I", nc.NFT_OBJECT_COUNTER) in req
