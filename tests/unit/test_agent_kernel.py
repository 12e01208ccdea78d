"""The agent's kernel thread: order, coalescing, absolute leases (multihost.agent_kernel)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import pytest

from multihost.agent_kernel import INF, Done, KernelThread, _Job, lease_ms
from multihost.dataplane.ruleset import GroupBuckets


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
