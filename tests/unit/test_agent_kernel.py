"""The agent's kernel thread: order, coalescing, absolute leases (multihost.agent_kernel)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from typing import Any, cast

import pytest

from multihost.agent_kernel import INF, Done, KernelSync, KernelThread, _Job, lease_inline, lease_ms
from multihost.config import parse_config
from multihost.dataplane.backend import Backend
from multihost.dataplane.ruleset import GroupBuckets
from multihost.logfmt import EventLog
from multihost.metrics import Metrics
from tests.unit.test_config import MINIMAL


def test_lease_ms() -> None:
    assert lease_ms(INF, 5.0) is None
    assert lease_ms(float("-inf"), 5.0) == 0
    assert lease_ms(4.0, 5.0) == 0
    assert lease_ms(5.25, 5.0) == 250


class Plane:
    """Records calls; ``gate`` holds the first update until released."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()

    def update(self, state: Mapping[str, GroupBuckets]) -> None:
        self.entered.set()
        assert self.gate.wait(10)
        self.calls.append(("update", dict(state)))

    def set_lease(self, expires_ms: int | None) -> None:
        self.calls.append(("lease", expires_ms))


def state(*owned: int) -> dict[str, GroupBuckets]:
    return {"g": GroupBuckets(owned=frozenset(owned))}


def test_jobs_queued_behind_a_slow_update_are_coalesced_in_order() -> None:
    plane = Plane()
    done: list[Done] = []
    kt = KernelThread(plane, done.append)
    try:
        kt.submit(_Job(state=state(1), reason="first", confirm=1))
        assert plane.entered.wait(10)  # the thread is inside the first update
        kt.submit(_Job(state=state(2), reason="second", confirm=2))
        kt.submit(_Job(lease=float("-inf")))
        kt.submit(_Job(state=state(3), reason="third"))
        kt.submit(_Job(confirm=3))
        fut = kt.call(lambda: "after")
        plane.gate.set()
        assert fut.result(10) == "after"
    finally:
        kt.close()
    # The first update, then one coalesced job: the lapse first, the newest state only.
    assert plane.calls == [("update", state(1)), ("lease", 0), ("update", state(3))]
    assert [(d.reason, d.confirm, d.leased) for d in done] == [
        ("first", 1, False),
        ("third", 3, True),
    ]


def test_a_failed_update_confirms_nothing() -> None:
    class Failing(Plane):
        def update(self, state: Mapping[str, GroupBuckets]) -> None:
            raise RuntimeError("kernel said no")

    done: list[Done] = []
    kt = KernelThread(Failing(), done.append)
    try:
        kt.submit(_Job(state=state(1), confirm=4))
        kt.call(lambda: None).result(10)
    finally:
        kt.close()
    assert len(done) == 1 and done[0].confirm is None and "kernel said no" in done[0].error


def test_call_after_close_fails() -> None:
    kt = KernelThread(Plane(), lambda d: None)
    kt.close()
    with pytest.raises(RuntimeError):
        kt.call(lambda: None).result(1)


def test_lease_renewals_wake_the_loop_only_when_held_flips() -> None:
    plane = Plane()
    plane.gate.set()
    done: list[Done] = []
    kt = KernelThread(plane, done.append)
    try:
        for until in (1e12, 1e12 + 1, float("-inf"), float("-inf"), INF):
            kt.submit(_Job(lease=until))
            kt.call(lambda: None).result(10)  # one job at a time: no coalescing
    finally:
        kt.close()
    assert [c[0] for c in plane.calls] == ["lease"] * 5
    assert kt.lease_writes == 5 and kt.lease_held
    assert [d.lease_ms for d in done] == [0, None]  # the lapse and the return only


class InlinePlane:
    """A plane whose lease write is inline (as XDP's): records the writing thread."""

    lease_inline = True

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, Any, int]] = []
        self.fail = fail

    def update(self, state: Mapping[str, GroupBuckets]) -> None:
        self.calls.append(("update", dict(state), threading.get_ident()))

    def set_lease(self, expires_ms: int | None) -> None:
        if self.fail:
            raise OSError("bpf_map_update_elem: EBADF")
        self.calls.append(("lease", expires_ms, threading.get_ident()))


def _sync(plane: InlinePlane) -> tuple[KernelSync, list[tuple[str, dict[str, Any]]]]:
    logs: list[tuple[str, dict[str, Any]]] = []

    def log(event: str, level: str = "info", **fields: Any) -> None:
        logs.append((event, fields))

    cfg = parse_config(MINIMAL, "m.toml")
    ks = KernelSync(
        cfg, cast(EventLog, log), Metrics("A"), on_applied=lambda s: None, on_confirm=print
    )
    ks.start(cast(Backend, plane), asyncio.new_event_loop())
    return ks, logs


def test_an_inline_lease_is_written_at_once_by_the_caller_and_logs_only_flips() -> None:
    plane = InlinePlane()
    ks, logs = _sync(plane)
    try:
        me = threading.get_ident()
        for until in (time.monotonic() + 10, time.monotonic() + 20, float("-inf"), INF):
            ks.set_lease(until)
        assert [(c[0], c[2]) for c in plane.calls] == [("lease", me)] * 4  # no hand-off
        assert 9_000 < plane.calls[0][1] <= 10_000 and 19_000 < plane.calls[1][1] <= 20_000
        assert [c[1] for c in plane.calls[2:]] == [0, None]
        assert ks.lease_updates == 4 and ks.lease_held
        assert [(e, f["held"]) for e, f in logs] == [
            ("kernel-lease", False),
            ("kernel-lease", True),
        ]
    finally:
        ks.close()


def test_a_failed_inline_lease_write_is_logged_and_not_counted() -> None:
    ks, logs = _sync(InlinePlane(fail=True))
    try:
        ks.set_lease(float("-inf"))
        assert ks.lease_updates == 0 and ks.lease_held  # the kernel kept what it had
        assert [e for e, _ in logs] == ["kernel-update-failed"]
        assert "EBADF" in logs[0][1]["error"]
    finally:
        ks.close()


def test_only_planes_that_say_so_take_the_inline_path() -> None:
    assert lease_inline(InlinePlane()) and not lease_inline(Plane())
    from multihost.dataplane.nft import Dataplane
    from multihost.dataplane.xdp import XdpDataplane

    assert XdpDataplane.lease_inline and not Dataplane.lease_inline
